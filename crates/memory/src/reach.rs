//! Which parts of guest RAM the guest can reach, in chunks of [`SLOT_CHUNK`] bytes.
//!
//! KVM keeps per-page metadata for every memory slot (reverse maps and write tracking under
//! shadow paging), allocated and zeroed when the slot is made: for a 1 GiB slot that is
//! several hundred microseconds and megabytes per VM, though a fork of a Python template
//! touches under 100 MiB of it. So the VMM gives KVM only the chunks the guest can reach.
//! The syscall layer notes every range it maps (`note`); the VMM registers the chunks it
//! has not yet (see `forkvm_vmm::vm`). Chunks are never taken back: a slot over memory the
//! program unmapped costs only its metadata, and the page tables keep the program out.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity of the memory slots (a multiple of 2 MiB, so a huge guest page never
/// straddles two slots).
pub const SLOT_CHUNK: u64 = 32 << 20;

/// The chunks of one guest RAM the guest can reach. Monotonic: chunks are only added.
#[derive(Debug, Default)]
pub struct Reach {
    chunks: Mutex<BTreeSet<u64>>,
    /// Bumped whenever a chunk is added, so a VM can tell it is behind with one load.
    generation: AtomicU64,
}

impl Reach {
    /// Notes that the guest can reach `[start, end)` (guest-physical, inside RAM: see
    /// `GuestRam::note_reachable`, which clips).
    pub(crate) fn note(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let mut chunks = self.chunks.lock().expect("reach lock");
        let mut added = false;
        for chunk in start / SLOT_CHUNK..=(end - 1) / SLOT_CHUNK {
            added |= chunks.insert(chunk);
        }
        if added {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Changes whenever a chunk is added.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The reachable chunks (by index: chunk `i` is `[i * SLOT_CHUNK, (i+1) * SLOT_CHUNK)`),
    /// in order, with the generation they are current for.
    pub fn chunks(&self) -> (Vec<u64>, u64) {
        let chunks = self.chunks.lock().expect("reach lock");
        (chunks.iter().copied().collect(), self.generation())
    }
}

impl Reach {
    /// The reachable chunks as merged guest-physical ranges, clipped to `ram_size`.
    pub fn ranges(&self, ram_size: u64) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for chunk in self.chunks().0 {
            let start = chunk * SLOT_CHUNK;
            if start >= ram_size {
                break;
            }
            let end = (start + SLOT_CHUNK).min(ram_size);
            match ranges.last_mut() {
                Some((_, last)) if *last == start => *last = end,
                _ => ranges.push((start, end)),
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_every_chunk_a_range_touches_once() {
        let reach = Reach::default();
        assert_eq!(reach.chunks(), (vec![], 0));
        reach.note(SLOT_CHUNK - 4096, SLOT_CHUNK + 4096);
        assert_eq!(reach.chunks().0, vec![0, 1]);
        let generation = reach.generation();
        reach.note(4096, 8192);
        reach.note(10, 10);
        assert_eq!(
            reach.generation(),
            generation,
            "nothing new, no new generation"
        );
        reach.note(5 * SLOT_CHUNK, 5 * SLOT_CHUNK + 1);
        assert_eq!(reach.chunks().0, vec![0, 1, 5]);
        assert_ne!(reach.generation(), generation);
        assert_eq!(
            reach.ranges(5 * SLOT_CHUNK + 4096),
            vec![(0, 2 * SLOT_CHUNK), (5 * SLOT_CHUNK, 5 * SLOT_CHUNK + 4096)]
        );
    }
}
