//! Readiness: whether a descriptor can be read or written without waiting, as the bits
//! `poll`, `select` and `epoll` report. Regular files and devices are always ready.

use crate::file::{FileObject, OpenFile, Stream};
use crate::process::Process;

pub const IN: u32 = 0x001;
pub const PRI: u32 = 0x002;
pub const OUT: u32 = 0x004;
pub const ERR: u32 = 0x008;
pub const HUP: u32 = 0x010;
pub const NVAL: u32 = 0x020;
pub const RDNORM: u32 = 0x040;
pub const WRNORM: u32 = 0x100;
pub const RDHUP: u32 = 0x2000;

/// Bits reported whether asked for or not.
pub const ALWAYS: u32 = ERR | HUP | NVAL;

impl Process {
    /// What `file` is ready for now.
    pub(crate) fn readiness(&self, file: &OpenFile) -> u32 {
        self.readiness_nested(file, 0)
    }

    /// `readiness` of a file inside `depth` epoll instances (an epoll is ready when one of
    /// its descriptors is; nesting is bounded as Linux bounds it).
    pub(crate) fn readiness_nested(&self, file: &OpenFile, depth: usize) -> u32 {
        match &file.object {
            FileObject::Pipe { id, end } => {
                let Some(pipe) = self.pipes.get(*id) else {
                    return NVAL;
                };
                let mut ready = 0;
                if end.writes() {
                    if pipe.readers == 0 {
                        ready |= ERR;
                    } else if pipe.room() > 0 {
                        ready |= OUT | WRNORM;
                    }
                }
                if end.reads() {
                    if !pipe.data.is_empty() {
                        ready |= IN | RDNORM;
                    } else if pipe.writers == 0 && pipe.had_writer {
                        ready |= HUP;
                    }
                }
                ready
            }
            FileObject::Socket(id) => self.sockets.readiness(*id),
            FileObject::Epoll(id) => {
                if self.epoll_has_ready(*id, depth + 1) {
                    IN | RDNORM
                } else {
                    0
                }
            }
            FileObject::EventFd(id) => self.eventfd_readiness(*id),
            FileObject::TimerFd(id) => self.timerfd_readiness(*id),
            FileObject::SignalFd(id) => self.signalfd_readiness(*id),
            FileObject::Console(Stream::Stdin) => IN | RDNORM,
            FileObject::Console(_) => OUT | WRNORM,
            FileObject::Control => 0,
            FileObject::Node { .. }
            | FileObject::Null
            | FileObject::Zero
            | FileObject::Random
            | FileObject::Generated(_) => IN | OUT | RDNORM | WRNORM,
        }
    }
}
