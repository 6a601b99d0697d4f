//! Pipes inside the sandbox: a bounded buffer between the process's threads. A read of an
//! empty pipe or a write to a full one blocks its thread (or answers `EAGAIN`); when every
//! thread waits and none can help, the sandbox ends with a deadlock instead of hanging
//! until its timeout.

use std::collections::VecDeque;

use forkvm_image::NodeId;
use serde::{Deserialize, Serialize};

/// Bytes a pipe holds (Linux's default pipe size).
pub const PIPE_CAPACITY: usize = 64 * 1024;
/// The most `F_SETPIPE_SZ` may ask for (Linux's default `/proc/sys/fs/pipe-max-size`).
pub const PIPE_MAX_CAPACITY: usize = 1 << 20;
/// Writes up to this size are atomic (POSIX `PIPE_BUF`).
pub const PIPE_BUF: usize = 4096;

/// Which end(s) of a pipe a description holds (a FIFO opened `O_RDWR` holds both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeEnd {
    Read,
    Write,
    Both,
}

impl PipeEnd {
    pub fn reads(self) -> bool {
        self != PipeEnd::Write
    }

    pub fn writes(self) -> bool {
        self != PipeEnd::Read
    }
}

/// One pipe's buffer and how many open descriptions each end has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pipe {
    pub data: VecDeque<u8>,
    pub readers: u32,
    pub writers: u32,
    /// The FIFO this pipe is the open state of (`mkfifo`), if any.
    pub fifo: Option<NodeId>,
    /// A writer has opened it: until then a FIFO's reader waits instead of seeing the end
    /// (Linux makes the reader's `open` wait; here its reads do).
    pub had_writer: bool,
    /// Bytes it holds when set by `F_SETPIPE_SZ` (0: `PIPE_CAPACITY`).
    #[serde(default)]
    pub capacity: usize,
}

impl Pipe {
    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        if self.capacity == 0 {
            PIPE_CAPACITY
        } else {
            self.capacity
        }
    }

    /// Free space in the buffer.
    pub fn room(&self) -> usize {
        self.capacity().saturating_sub(self.data.len())
    }

    /// `F_SETPIPE_SZ`: at least `wanted` bytes, a power of two of pages, up to
    /// `PIPE_MAX_CAPACITY` (`EPERM` beyond), and never below what it holds (`EBUSY`).
    pub fn resize(&mut self, wanted: u64) -> Result<usize, syscalls::Errno> {
        let size = usize::try_from(wanted)
            .ok()
            .filter(|&w| w <= PIPE_MAX_CAPACITY)
            .ok_or(syscalls::Errno::EPERM)?
            .max(4096)
            .next_power_of_two();
        if size < self.data.len() {
            return Err(syscalls::Errno::EBUSY);
        }
        self.capacity = size;
        Ok(size)
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
            fifo: None,
            had_writer: true,
            capacity: 0,
        };
        self.insert(pipe)
    }

    /// The pipe behind FIFO `node`, made (with no ends open) if none is open.
    pub fn fifo(&mut self, node: NodeId) -> usize {
        if let Some(id) = self
            .slots
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.fifo == Some(node)))
        {
            return id;
        }
        self.insert(Pipe {
            fifo: Some(node),
            ..Pipe::default()
        })
    }

    fn insert(&mut self, pipe: Pipe) -> usize {
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

    /// Frees a FIFO's pipe that no end holds (an open of it failed).
    pub fn drop_if_unused(&mut self, id: usize) {
        if self
            .get(id)
            .is_some_and(|p| p.readers == 0 && p.writers == 0)
        {
            self.slots[id] = None;
        }
    }

    /// Another description holds `end` (a descriptor passed over a socket, a FIFO opened).
    pub fn retain(&mut self, id: usize, end: PipeEnd) {
        if let Some(pipe) = self.get_mut(id) {
            if end.reads() {
                pipe.readers += 1;
            }
            if end.writes() {
                pipe.writers += 1;
                pipe.had_writer = true;
            }
        }
    }

    /// A description holding `end` was closed; the pipe goes with its last end.
    pub fn release(&mut self, id: usize, end: PipeEnd) {
        let Some(pipe) = self.get_mut(id) else {
            return;
        };
        if end.writes() {
            pipe.writers = pipe.writers.saturating_sub(1);
        }
        if end.reads() {
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
        pipes.release(a, PipeEnd::Write);
        assert!(pipes.get(a).is_some());
        pipes.release(a, PipeEnd::Read);
        assert!(pipes.get(a).is_none());
        assert_eq!(pipes.create(), a);
    }
}
