//! The two bitmaps a tracker shares with its BPF program, one bit per block: `live`, which
//! the program sets with atomic ORs as writes happen, and `taken`, which only the agent
//! writes. Taking moves bits from live to taken without a window in which a write could be
//! lost: a word's bits are first ORed into taken, then cleared from live with an atomic AND
//! of exactly those bits, so a bit the program sets meanwhile stays in live. Taken bits are
//! cleared only once the master target has acknowledged the cycle that read them; a failed
//! or killed cycle leaves them for the next one (which is the merge back on failure).
//!
//! Pure over two slices of atomics, so it is unit-tested on ordinary memory here; the
//! tracker maps the BPF map over them.

use std::sync::atomic::{AtomicU64, Ordering};

use engine::block::ranges::Runs;

/// The live and taken bitmaps of one disk of `blocks` blocks.
pub struct Marks<'a> {
    live: &'a [AtomicU64],
    taken: &'a [AtomicU64],
    blocks: u64,
}

/// Words needed for `blocks` bits.
pub fn words_for(blocks: u64) -> u64 {
    blocks.div_ceil(64)
}

impl<'a> Marks<'a> {
    /// `words` holds live then taken, each [`words_for`]`(blocks)` long.
    pub fn new(words: &'a [AtomicU64], blocks: u64) -> Option<Self> {
        let half = usize::try_from(words_for(blocks)).ok()?;
        if words.len() < half.checked_mul(2)? {
            return None;
        }
        let (live, rest) = words.split_at(half);
        Some(Self {
            live,
            taken: &rest[..half],
            blocks,
        })
    }

    /// Moves every live mark to taken; returns the blocks that were newly marked live (what
    /// was written since the last take).
    pub fn take(&self) -> Runs {
        let mut fresh = Runs::new();
        for (index, (live, taken)) in self.live.iter().zip(self.taken).enumerate() {
            let bits = live.load(Ordering::Acquire);
            if bits == 0 {
                continue;
            }
            taken.fetch_or(bits, Ordering::AcqRel);
            live.fetch_and(!bits, Ordering::AcqRel);
            push_bits(&mut fresh, index as u64, bits, self.blocks);
        }
        fresh
    }

    /// Every taken block, not yet acknowledged.
    pub fn taken(&self) -> Runs {
        runs_of(self.taken, self.blocks)
    }

    /// Blocks marked live and not yet taken.
    pub fn live_count(&self) -> u64 {
        count(self.live)
    }

    /// Blocks taken and not yet acknowledged.
    pub fn taken_count(&self) -> u64 {
        count(self.taken)
    }

    /// Forgets the taken blocks: the master target acknowledged them.
    pub fn clear_taken(&self) {
        for word in self.taken {
            word.store(0, Ordering::Release);
        }
    }

    /// Marks every block live: whatever happened, the next cycle compares the whole disk.
    #[cfg(test)]
    pub fn mark_all(&self) {
        for word in self.live {
            word.store(u64::MAX, Ordering::Release);
        }
    }
}

fn count(words: &[AtomicU64]) -> u64 {
    words
        .iter()
        .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
        .sum()
}

fn runs_of(words: &[AtomicU64], blocks: u64) -> Runs {
    let mut runs = Runs::new();
    for (index, word) in words.iter().enumerate() {
        let bits = word.load(Ordering::Acquire);
        if bits != 0 {
            push_bits(&mut runs, index as u64, bits, blocks);
        }
    }
    runs
}

/// Adds the set bits of word `index` as runs, ignoring bits past the last block.
fn push_bits(runs: &mut Runs, index: u64, mut bits: u64, blocks: u64) {
    let base = index * 64;
    while bits != 0 {
        let start = u64::from(bits.trailing_zeros());
        let ones = u64::from((bits >> start).trailing_ones());
        let first = base + start;
        let end = (first + ones).min(blocks);
        if first < end {
            runs.push(first, end - first);
        }
        bits = if start + ones >= 64 {
            0
        } else {
            bits & !(((1u64 << ones) - 1) << start)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(blocks: u64) -> Vec<AtomicU64> {
        (0..words_for(blocks) * 2)
            .map(|_| AtomicU64::new(0))
            .collect()
    }

    fn set(words: &[AtomicU64], block: u64) {
        words[usize::try_from(block / 64).unwrap()].fetch_or(1 << (block % 64), Ordering::AcqRel);
    }

    #[test]
    fn a_take_moves_live_marks_to_taken_as_runs() {
        let storage = words(200);
        let marks = Marks::new(&storage, 200).unwrap();
        for block in [0, 1, 2, 63, 64, 65, 130, 199] {
            set(&storage, block);
        }
        let fresh = marks.take();
        assert_eq!(fresh.as_slice(), [(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(marks.live_count(), 0);
        assert_eq!(marks.taken_count(), 8);
        // Nothing new: an empty take; the taken set stays until acknowledged.
        assert!(marks.take().is_empty());
        set(&storage, 5);
        assert_eq!(marks.take().as_slice(), [(5, 1)]);
        assert_eq!(
            marks.taken().as_slice(),
            [(0, 3), (5, 1), (63, 3), (130, 1), (199, 1)]
        );
        marks.clear_taken();
        assert!(marks.taken().is_empty());
    }

    #[test]
    fn whole_words_and_bits_past_the_last_block() {
        let storage = words(100);
        let marks = Marks::new(&storage, 100).unwrap();
        marks.mark_all();
        assert_eq!(marks.take().as_slice(), [(0, 100)]);
        assert_eq!(marks.taken().block_count(), 100);
    }

    #[test]
    fn a_map_too_small_for_the_disk_is_refused() {
        let storage = words(64);
        assert!(Marks::new(&storage, 65).is_none());
    }

    #[test]
    fn marks_set_while_taking_are_never_lost() {
        let storage = std::sync::Arc::new(words(64 * 64));
        let writer = {
            let storage = storage.clone();
            std::thread::spawn(move || {
                for round in 0..20_000u64 {
                    set(&storage, (round * 7919) % 4096);
                }
            })
        };
        let marks = Marks::new(&storage, 4096).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() {
            seen.extend(marks.take().indices());
        }
        writer.join().unwrap();
        seen.extend(marks.take().indices());
        let expected: std::collections::BTreeSet<u64> =
            (0..20_000u64).map(|r| (r * 7919) % 4096).collect();
        assert_eq!(seen, expected);
    }
}
