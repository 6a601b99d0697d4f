//! Descriptors that carry notifications rather than data: `eventfd` (a counter), `timerfd`
//! (expirations of a timer) and `signalfd` (pending signals), and `epoll` instances (sets
//! of descriptors to watch). Their syscalls are in `syscalls::notify` and `syscalls::epoll`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::signals::SigSet;
use crate::slab::Slab;
use crate::timers::Schedule;

/// An `eventfd` counter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventFd {
    pub count: u64,
    /// `EFD_SEMAPHORE`: a read takes 1, not everything.
    pub semaphore: bool,
}

/// A `timerfd`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimerFd {
    pub clock: i32,
    pub schedule: Option<Schedule>,
    /// Expirations since the last read.
    pub expirations: u64,
}

/// A `signalfd`: which signals it reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalFd {
    pub mask: SigSet,
}

/// One descriptor an epoll instance watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interest {
    /// The events asked for, with `EPOLLET`/`EPOLLONESHOT`.
    pub events: u32,
    pub data: u64,
    /// The open file description it was added for (a new one at the same number is not it).
    pub description: usize,
    /// `EPOLLONESHOT` fired: reported no more until re-armed with `EPOLL_CTL_MOD`.
    pub disarmed: bool,
    /// The I/O generation last reported (edge-triggered interests report a change once).
    pub reported: u64,
}

/// An epoll instance: its interests by descriptor number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Epoll {
    pub interests: BTreeMap<i32, Interest>,
    /// The descriptor reported last (the next wait starts after it).
    pub cursor: i32,
}

/// Every notification object of the process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Notifiers {
    pub eventfds: Slab<EventFd>,
    pub timerfds: Slab<TimerFd>,
    pub signalfds: Slab<SignalFd>,
    pub epolls: Slab<Epoll>,
    /// Counts I/O events in the sandbox (edge-triggered epoll compares against it).
    pub generation: u64,
}

impl Notifiers {
    /// The earliest expiry of an armed timerfd.
    pub fn next_timer(&self) -> Option<u64> {
        self.timerfds
            .iter()
            .filter_map(|(_, t)| t.schedule.map(|s| s.next_ns))
            .min()
    }
}
