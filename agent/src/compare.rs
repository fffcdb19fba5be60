//! Top-down comparison of two hash trees of the same shape.
//!
//! Starting from the roots, each round asks the far side for the children of the nodes that
//! differed in the round before, and keeps those that differ again. After one round per
//! level, what remains are the differing blocks. The far side is reached through a
//! [`RemoteTree`], so the walk itself is pure and unit-tested here.

use engine::block::geometry::BlockHash;
use engine::block::manifest::{children, Manifest};
use engine::block::ranges::Runs;
use engine::error::{Error, Result};

/// Hashes per request: half a frame of answers.
pub const MAX_HASHES_PER_QUERY: u64 = 128 * 1024;

/// Access to the far side's tree.
pub trait RemoteTree {
    /// The hashes of `ranges` (start, count) of `level`, in order.
    fn hashes(
        &mut self,
        level: u8,
        ranges: Vec<(u64, u32)>,
    ) -> impl std::future::Future<Output = Result<Vec<BlockHash>>>;
}

/// Returns the blocks whose hashes differ, as runs, and the number of hashes fetched.
pub async fn differing_blocks(
    local: &Manifest,
    remote_root: BlockHash,
    remote: &mut impl RemoteTree,
) -> Result<(Runs, u64)> {
    let top = local.depth().saturating_sub(1);
    if local.root() == remote_root {
        return Ok((Runs::new(), 0));
    }
    let mut differing: Vec<u64> = vec![0];
    let mut fetched = 0u64;
    for level in (0..top).rev() {
        let level_len = local.level_len(level);
        let mut wanted = Runs::new();
        for &node in &differing {
            let below = children(node, level_len);
            wanted.push(below.start, below.end.saturating_sub(below.start));
        }
        let mut next = Vec::new();
        for batch in wanted.batches(MAX_HASHES_PER_QUERY) {
            let level_byte =
                u8::try_from(level).map_err(|_| Error::Invalid("hash tree too deep".into()))?;
            let expected: u64 = batch.iter().map(|&(_, n)| n).sum();
            let ranges = batch
                .iter()
                .map(|&(s, n)| (s, u32::try_from(n).unwrap_or(u32::MAX)))
                .collect();
            let theirs = remote.hashes(level_byte, ranges).await?;
            if theirs.len() as u64 != expected {
                return Err(Error::Protocol(format!(
                    "asked for {expected} hashes, received {}",
                    theirs.len()
                )));
            }
            fetched += expected;
            let mut theirs = theirs.into_iter();
            for &(start, count) in &batch {
                let ours = local.nodes(level, start, count)?;
                for (index, ours) in (start..).zip(ours) {
                    if theirs.next() != Some(ours) {
                        next.push(index);
                    }
                }
            }
        }
        differing = next;
    }
    Ok((differing.into_iter().collect(), fetched))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use engine::block::geometry::{BlockSize, Geometry};

    struct Local<'a>(&'a Manifest, u64);

    impl RemoteTree for Local<'_> {
        async fn hashes(&mut self, level: u8, ranges: Vec<(u64, u32)>) -> Result<Vec<BlockHash>> {
            self.1 += 1;
            Ok(ranges
                .into_iter()
                .flat_map(|(s, n)| self.0.nodes(usize::from(level), s, u64::from(n)).unwrap())
                .collect())
        }
    }

    fn manifest(n: u64, changed: &[u64]) -> Manifest {
        let leaves = (0..n)
            .map(|i| {
                let salt = u8::from(changed.contains(&i));
                *blake3::hash(&[&i.to_be_bytes()[..], &[salt]].concat()).as_bytes()
            })
            .collect::<Vec<_>>();
        Manifest::temporary(
            &std::env::temp_dir(),
            Geometry::new(n * 4096, BlockSize::new(4096).unwrap()).unwrap(),
            &leaves,
        )
        .unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn finds_exactly_the_changed_blocks_with_traffic_that_follows_the_change() {
        let changed = [3, 700, 701, 4095];
        let ours = manifest(4096, &changed);
        let theirs = manifest(4096, &[]);
        let mut remote = Local(&theirs, 0);
        let (diff, fetched) =
            block_on(differing_blocks(&ours, theirs.root(), &mut remote)).unwrap();
        assert_eq!(diff.indices().collect::<Vec<_>>(), changed);
        // One round trip per level below the root; a few hundred hashes, not 4096.
        assert_eq!(remote.1, ours.depth() as u64 - 1);
        assert!(fetched < 300, "fetched {fetched}");
    }

    #[test]
    fn equal_trees_need_no_traffic() {
        let m = manifest(100, &[]);
        let mut remote = Local(&m, 0);
        let (diff, fetched) = block_on(differing_blocks(&m, m.root(), &mut remote)).unwrap();
        assert!(diff.is_empty());
        assert_eq!((fetched, remote.1), (0, 0));
    }

    #[test]
    fn batches_respect_the_query_limit() {
        let indices: Runs = (0..MAX_HASHES_PER_QUERY * 2 + 5).collect();
        let batches: Vec<_> = indices.batches(MAX_HASHES_PER_QUERY).collect();
        assert_eq!(batches.len(), 3);
        assert!(batches
            .iter()
            .all(|b| b.iter().map(|r| r.1).sum::<u64>() <= MAX_HASHES_PER_QUERY));
    }
}
