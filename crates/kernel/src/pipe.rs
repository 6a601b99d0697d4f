//! Pipes inside the sandbox: a bounded buffer between the process's threads. A read of an
//! empty pipe or a write to a full one blocks its thread (or answers `EAGAIN`); when every
//! thread waits and none can help, the sandbox ends with a deadlock instead of hanging
//! until its timeout.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Bytes a pipe holds (Linux's default pipe size).
pub const PIPE_CAPACITY: usize = 64 * 1024;
/// Writes up to this size are atomic (POSIX `PIPE_BUF`).
pub const PIPE_BUF: usize = 4096;

/// One pipe's buffer and how many open descriptions each end has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pipe {
    pub data: VecDeque<u8>,
    pub readers: u32,
    pub writers: u32,
}

impl Pipe {
    /// Free space in the buffer.
    pub fn room(&self) -> usize {
        PIPE_CAPACITY - self.data.len()
    }
}

/// All pipes of a process, indexed by the id their descriptions carry.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pipes {
    slots: Vec<Option<Pipe>>,
}

impl Pipes {
    /// A new pipe with one reading and one writing description.
    pub fn create(&mut self) -> usize {
        let pipe = Pipe {
            data: VecDeque::new(),
            readers: 1,
            writers: 1,
        };
        match self.slots.iter().position(Option::is_none) {
            Some(id) => {
                self.slots[id] = Some(pipe);
                id
            }
            None => {
                self.slots.push(Some(pipe));
                self.slots.len() - 1
            }
        }
    }

    pub fn get(&self, id: usize) -> Option<&Pipe> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, id: usize) -> Option<&mut Pipe> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    /// Another description refers to one end (a descriptor passed over a socket).
    pub fn retain(&mut self, id: usize, write_end: bool) {
        if let Some(pipe) = self.get_mut(id) {
            if write_end {
                pipe.writers += 1;
            } else {
                pipe.readers += 1;
            }
        }
    }

    /// Records that a description of one end was closed; frees the pipe with its last end.
    pub fn release(&mut self, id: usize, write_end: bool) {
        let Some(pipe) = self.get_mut(id) else {
            return;
        };
        if write_end {
            pipe.writers = pipe.writers.saturating_sub(1);
        } else {
            pipe.readers = pipe.readers.saturating_sub(1);
        }
        if pipe.readers == 0 && pipe.writers == 0 {
            self.slots[id] = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_are_reused_after_both_ends_close() {
        let mut pipes = Pipes::default();
        let a = pipes.create();
        pipes.release(a, true);
        assert!(pipes.get(a).is_some());
        pipes.release(a, false);
        assert!(pipes.get(a).is_none());
        assert_eq!(pipes.create(), a);
    }
}
