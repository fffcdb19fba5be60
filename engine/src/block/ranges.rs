//! Runs of consecutive blocks, and batches of runs capped in blocks.
//!
//! Whatever finds changed blocks (a tree compare, a dirty bitmap, a journal) hands them on
//! as runs `(first, count)`, never as a list of single blocks: a whole disk stays one run,
//! so memory follows the number of changed regions, not the disk size. [`Batches`] cuts
//! runs lazily into jobs of at most a given number of blocks (what one `Blocks` message or
//! one hash query may hold), splitting long runs.

/// Consecutive blocks: the first block's index and how many.
pub type Run = (u64, u64);

/// Sorted, non-overlapping runs that merge as they are added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runs(Vec<Run>);

impl Runs {
    /// No blocks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every block of a disk of `blocks` blocks, as one run.
    pub fn whole(blocks: u64) -> Self {
        let mut runs = Self::new();
        runs.push(0, blocks);
        runs
    }

    /// Adds `count` blocks from `first`; they must not start before the end of the last
    /// run minus its overlap (callers add in ascending order). Touching or overlapping runs
    /// merge; empty runs are ignored.
    pub fn push(&mut self, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let end = first.saturating_add(count);
        if let Some((start, len)) = self.0.last_mut() {
            let last_end = start.saturating_add(*len);
            if first <= last_end {
                *len = end.max(last_end) - *start;
                return;
            }
        }
        self.0.push((first, end - first));
    }

    /// The blocks in all runs together.
    pub fn block_count(&self) -> u64 {
        self.0.iter().map(|&(_, n)| n).fold(0, u64::saturating_add)
    }

    /// True when no block is selected.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The runs, ascending.
    pub fn as_slice(&self) -> &[Run] {
        &self.0
    }

    /// Every block index, ascending (for tests and small sets only).
    pub fn indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|&(s, n)| s..s.saturating_add(n))
    }

    /// True when any of `count` blocks from `first` is in a run.
    pub fn overlaps(&self, first: u64, count: u64) -> bool {
        let end = first.saturating_add(count);
        // Runs are sorted and disjoint: the last run starting before `end` decides.
        let starting_before = self.0.partition_point(|&(start, _)| start < end);
        starting_before > 0
            && self.0[starting_before - 1]
                .0
                .saturating_add(self.0[starting_before - 1].1)
                > first
    }

    /// The parts of the runs within `count` blocks from `first`, clipped to them, in order.
    pub fn within(&self, first: u64, count: u64) -> impl Iterator<Item = Run> + '_ {
        let end = first.saturating_add(count);
        // The first run that ends after `first`.
        let from = self
            .0
            .partition_point(|&(start, len)| start.saturating_add(len) <= first);
        self.0[from..]
            .iter()
            .take_while(move |&&(start, _)| start < end)
            .map(move |&(start, len)| {
                let clipped = start.max(first);
                (clipped, start.saturating_add(len).min(end) - clipped)
            })
    }

    /// The runs cut into batches of at most `per_batch` blocks.
    pub fn batches(&self, per_batch: u64) -> Batches<'_> {
        Batches::new(&self.0, per_batch)
    }
}

impl FromIterator<u64> for Runs {
    /// Runs from ascending block indices.
    fn from_iter<I: IntoIterator<Item = u64>>(indices: I) -> Self {
        let mut runs = Self::new();
        for index in indices {
            runs.push(index, 1);
        }
        runs
    }
}

/// Runs grouped into batches of at most `per_batch` blocks, long runs split. Lazy, so that
/// a whole disk stays one run and never becomes a list of its blocks.
pub struct Batches<'a> {
    runs: std::slice::Iter<'a, Run>,
    rest_of_run: Option<Run>,
    per_batch: u64,
}

impl<'a> Batches<'a> {
    /// Batches of `runs`; `per_batch` of 0 is taken as 1.
    pub fn new(runs: &'a [Run], per_batch: u64) -> Self {
        Self {
            runs: runs.iter(),
            rest_of_run: None,
            per_batch: per_batch.max(1),
        }
    }
}

impl Iterator for Batches<'_> {
    type Item = Vec<Run>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut batch = Vec::new();
        let mut in_batch = 0;
        while in_batch < self.per_batch {
            let next = self
                .rest_of_run
                .take()
                .or_else(|| self.runs.next().copied());
            let Some((start, count)) = next else { break };
            if count == 0 {
                continue;
            }
            let take = count.min(self.per_batch - in_batch);
            batch.push((start, take));
            in_batch += take;
            if take < count {
                self.rest_of_run = Some((start + take, count - take));
            }
        }
        (!batch.is_empty()).then_some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_clips_runs_to_a_range() {
        let mut runs = Runs::new();
        runs.push(2, 3);
        runs.push(10, 10);
        runs.push(30, 1);
        let got: Vec<Run> = runs.within(3, 10).collect();
        assert_eq!(got, vec![(3, 2), (10, 3)]);
        assert_eq!(runs.within(5, 5).count(), 0);
        assert_eq!(runs.within(0, 100).collect::<Vec<_>>(), runs.as_slice());
    }

    #[test]
    fn indices_merge_into_runs() {
        let runs: Runs = [1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(runs.as_slice(), [(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs.block_count(), 6);
        assert_eq!(runs.indices().collect::<Vec<_>>(), [1, 2, 3, 7, 9, 10]);
    }

    #[test]
    fn touching_and_overlapping_runs_merge() {
        let mut runs = Runs::new();
        runs.push(0, 4);
        runs.push(4, 2);
        runs.push(5, 3);
        runs.push(10, 0);
        runs.push(12, 1);
        assert_eq!(runs.as_slice(), [(0, 8), (12, 1)]);
    }

    #[test]
    fn batches_hold_at_most_their_size_and_cover_every_block_once() {
        let runs = [(0, 5), (10, 1), (20, 0), (30, 7)];
        let batches: Vec<Vec<Run>> = Batches::new(&runs, 4).collect();
        assert_eq!(
            batches,
            [
                vec![(0, 4)],
                vec![(4, 1), (10, 1), (30, 2)],
                vec![(32, 4)],
                vec![(36, 1)],
            ]
        );
        let whole_disk = Runs::whole(1 << 24);
        assert_eq!(whole_disk.batches(64).count(), 1 << 18);
        assert_eq!(whole_disk.batches(64).nth(1).unwrap(), [(64, 64)]);
    }

    #[test]
    fn overlaps_finds_any_block_in_a_run() {
        let runs: Runs = [2, 3, 10].into_iter().collect();
        assert!(runs.overlaps(0, 3));
        assert!(!runs.overlaps(0, 2));
        assert!(!runs.overlaps(4, 6));
        assert!(runs.overlaps(4, 7));
        assert!(runs.overlaps(10, 1));
        assert!(!runs.overlaps(11, u64::MAX));
        assert!(!Runs::new().overlaps(0, 100));
    }

    #[test]
    fn a_huge_run_does_not_overflow() {
        let mut runs = Runs::new();
        runs.push(u64::MAX - 1, 5);
        runs.push(u64::MAX - 1, 1);
        assert_eq!(runs.as_slice(), [(u64::MAX - 1, 1)]);
    }
}
