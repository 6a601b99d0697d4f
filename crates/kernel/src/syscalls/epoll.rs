//! `epoll`: instances that watch descriptors, level- or edge-triggered, one-shot or not.
//!
//! An interest belongs to the open file description it was added for, as in Linux: it
//! stays while a duplicate of the descriptor is open and goes with the description's last
//! descriptor. Readiness is computed when asked (`readiness`), so an instance holds no
//! queue that could go stale. Edge-triggered interests report again only after some I/O
//! happened in the sandbox since their last report: a wakeup Linux would not give is
//! possible, a lost one is not.

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::SysResult;
use super::poll::Deadline;
use crate::file::{FileObject, OpenFile};
use crate::notify::{Epoll, Interest};
use crate::process::Process;
use crate::readiness::{ERR, HUP};
use crate::signals::SigSet;
use crate::threads::monotonic_ns;

const EPOLL_CTL_ADD: i32 = 1;
const EPOLL_CTL_DEL: i32 = 2;
const EPOLL_CTL_MOD: i32 = 3;
const EPOLLEXCLUSIVE: u32 = 1 << 28;
const EPOLLWAKEUP: u32 = 1 << 29;
const EPOLLONESHOT: u32 = 1 << 30;
const EPOLLET: u32 = 1 << 31;
/// How deep epoll instances may nest (Linux's `EP_MAX_NESTS`).
const MAX_NESTING: usize = 4;

/// `struct epoll_event`, packed on x86-64 (the data is not 8-byte aligned): fields are
/// copied out, never borrowed.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct EpollEvent {
    events: u32,
    data: u64,
}

// SAFETY: packed integers: no padding, and every byte pattern is a value.
unsafe impl ByteValued for EpollEvent {}

const _: () = {
    assert!(size_of::<EpollEvent>() == 12);
    assert!(offset_of!(EpollEvent, data) == 4);
};

impl Process {
    fn epoll_id(&self, fd: i32) -> Result<usize, Errno> {
        match self.files.get(fd)?.object {
            FileObject::Epoll(id) => Ok(id),
            _ => Err(Errno::EINVAL),
        }
    }

    pub(crate) fn sys_epoll_create1(&mut self, flags: i32) -> SysResult {
        if flags & !libc::EPOLL_CLOEXEC != 0 {
            return Err(Errno::EINVAL.into());
        }
        let id = self.notifiers.epolls.insert(Epoll::default());
        let file = OpenFile::new(
            FileObject::Epoll(id),
            libc::O_RDWR,
            b"anon_inode:[eventpoll]".to_vec(),
        );
        match self.files.open(file, flags & libc::EPOLL_CLOEXEC != 0) {
            Ok(fd) => Ok(fd as u64),
            Err(e) => {
                self.notifiers.epolls.release(id);
                Err(e.into())
            }
        }
    }

    pub(crate) fn sys_epoll_create(&mut self, size: i32) -> SysResult {
        if size <= 0 {
            return Err(Errno::EINVAL.into());
        }
        self.sys_epoll_create1(0)
    }

    pub(crate) fn sys_epoll_ctl(&mut self, epfd: i32, op: i32, fd: i32, event: u64) -> SysResult {
        let id = self.epoll_id(epfd)?;
        let target = self.files.get(fd)?;
        if fd == epfd {
            return Err(Errno::EINVAL.into());
        }
        // Regular files and directories are always ready: Linux refuses to watch them.
        if matches!(
            target.object,
            FileObject::Node { .. } | FileObject::Generated(_)
        ) {
            return Err(Errno::EPERM.into());
        }
        if let FileObject::Epoll(inner) = target.object
            && (inner == id || self.epoll_reaches(inner, id, 0))
        {
            return Err(Errno::ELOOP.into());
        }
        let description = self.files.description_of(fd)?;
        let (events, data) = if op == EPOLL_CTL_DEL {
            (0, 0)
        } else {
            let event: EpollEvent = self.read_obj(event)?;
            (event.events & !EPOLLWAKEUP, event.data)
        };
        let generation = self.notifiers.generation;
        let epoll = self.notifiers.epolls.get_mut(id).ok_or(Errno::EBADF)?;
        let existing = epoll
            .interests
            .get(&fd)
            .filter(|i| i.description == description)
            .copied();
        match op {
            EPOLL_CTL_ADD => {
                if existing.is_some() {
                    return Err(Errno::EEXIST.into());
                }
                if events & EPOLLEXCLUSIVE != 0 && events & EPOLLONESHOT != 0 {
                    return Err(Errno::EINVAL.into());
                }
                epoll.interests.insert(
                    fd,
                    Interest {
                        events,
                        data,
                        description,
                        disarmed: false,
                        reported: generation.wrapping_sub(1),
                    },
                );
            }
            EPOLL_CTL_MOD => {
                let Some(old) = existing else {
                    return Err(Errno::ENOENT.into());
                };
                if events & EPOLLEXCLUSIVE != 0 || old.events & EPOLLEXCLUSIVE != 0 {
                    return Err(Errno::EINVAL.into());
                }
                epoll.interests.insert(
                    fd,
                    Interest {
                        events,
                        data,
                        disarmed: false,
                        reported: generation.wrapping_sub(1),
                        ..old
                    },
                );
            }
            EPOLL_CTL_DEL => {
                if existing.is_none() {
                    return Err(Errno::ENOENT.into());
                }
                epoll.interests.remove(&fd);
            }
            _ => return Err(Errno::EINVAL.into()),
        }
        // A waiter on this instance may now have something to report.
        self.io_event();
        Ok(0)
    }

    /// Whether epoll `from` watches `to`, directly or through nested instances.
    fn epoll_reaches(&self, from: usize, to: usize, depth: usize) -> bool {
        if depth > MAX_NESTING {
            return true;
        }
        let Some(epoll) = self.notifiers.epolls.get(from) else {
            return false;
        };
        epoll.interests.values().any(|interest| {
            match self
                .files
                .description(interest.description)
                .map(|f| &f.object)
            {
                Some(FileObject::Epoll(inner)) => {
                    *inner == to || self.epoll_reaches(*inner, to, depth + 1)
                }
                _ => false,
            }
        })
    }

    /// What `interest` would report now (0: nothing), `depth` instances deep.
    fn interest_events(&self, interest: &Interest, depth: usize) -> u32 {
        if interest.disarmed {
            return 0;
        }
        let Some(file) = self.files.description(interest.description) else {
            return 0;
        };
        let events = self.readiness_nested(file, depth) & (interest.events | ERR | HUP);
        if interest.events & EPOLLET != 0 && interest.reported == self.notifiers.generation {
            return 0;
        }
        events
    }

    /// Whether epoll `id` has an event to report (its own readiness, for `poll` and nested
    /// instances).
    pub(crate) fn epoll_has_ready(&self, id: usize, depth: usize) -> bool {
        if depth > MAX_NESTING {
            return false;
        }
        self.notifiers.epolls.get(id).is_some_and(|epoll| {
            epoll
                .interests
                .values()
                .any(|interest| self.interest_events(interest, depth) != 0)
        })
    }

    /// The description with number `description` went with its last descriptor: no epoll
    /// instance watches it any more.
    pub(crate) fn forget_description(&mut self, description: usize) {
        for (_, epoll) in self.notifiers.epolls.iter_mut() {
            epoll.interests.retain(|_, i| i.description != description);
        }
    }

    pub(crate) fn sys_epoll_wait(
        &mut self,
        epfd: i32,
        events: u64,
        max: i32,
        timeout_ms: i32,
    ) -> SysResult {
        let deadline = match timeout_ms {
            t if t < 0 => Deadline::Never,
            t => Deadline::after(self, t as u64 * 1_000_000),
        };
        self.epoll_wait_until(epfd, events, max, deadline, None)
    }

    pub(crate) fn sys_epoll_pwait(
        &mut self,
        epfd: i32,
        events: u64,
        max: i32,
        timeout_ms: i32,
        mask: u64,
        mask_size: u64,
    ) -> SysResult {
        let mask = self.read_wait_mask(mask, mask_size)?;
        let deadline = match timeout_ms {
            t if t < 0 => Deadline::Never,
            t => Deadline::after(self, t as u64 * 1_000_000),
        };
        self.epoll_wait_until(epfd, events, max, deadline, mask)
    }

    /// `epoll_pwait2`: the timeout is a `timespec` (null: no limit).
    pub(crate) fn sys_epoll_pwait2(
        &mut self,
        epfd: i32,
        events: u64,
        max: i32,
        timeout: u64,
        mask: u64,
        mask_size: u64,
    ) -> SysResult {
        let mask = self.read_wait_mask(mask, mask_size)?;
        let deadline = match self.wait_deadline(timeout, false, false)? {
            None => Deadline::Never,
            Some(at) if at <= monotonic_ns() => Deadline::Now,
            Some(at) => Deadline::At(at),
        };
        self.epoll_wait_until(epfd, events, max, deadline, mask)
    }

    fn epoll_wait_until(
        &mut self,
        epfd: i32,
        out: u64,
        max: i32,
        deadline: Deadline,
        mask: Option<SigSet>,
    ) -> SysResult {
        let max = usize::try_from(max).map_err(|_| Errno::EINVAL)?;
        if max == 0 || max > i32::MAX as usize / size_of::<EpollEvent>() {
            return Err(Errno::EINVAL.into());
        }
        let id = self.epoll_id(epfd)?;
        self.check_user(out, size_of::<EpollEvent>() as u64)?;
        self.fire_timers(monotonic_ns());
        let epoll = self.notifiers.epolls.get(id).ok_or(Errno::EBADF)?;
        // Start after the descriptor reported last, so a busy one cannot starve the rest
        // when there are more ready than `max`.
        let cursor = epoll.cursor;
        let order: Vec<(i32, Interest)> = epoll
            .interests
            .range(cursor.saturating_add(1)..)
            .chain(epoll.interests.range(..=cursor))
            .map(|(&fd, &i)| (fd, i))
            .collect();
        let mut ready = Vec::new();
        for (fd, interest) in order {
            if ready.len() == max {
                break;
            }
            let events = self.interest_events(&interest, 0);
            if events != 0 {
                ready.push((fd, events, interest.data));
            }
        }
        if ready.is_empty() {
            self.wait_for_io(deadline, mask)?;
            return Ok(0);
        }
        let records: Vec<EpollEvent> = ready
            .iter()
            .map(|&(_, events, data)| EpollEvent { events, data })
            .collect();
        self.write_objs(out, &records)?;
        let generation = self.notifiers.generation;
        let epoll = self.notifiers.epolls.get_mut(id).ok_or(Errno::EBADF)?;
        for &(fd, _, _) in &ready {
            if let Some(interest) = epoll.interests.get_mut(&fd) {
                interest.reported = generation;
                interest.disarmed |= interest.events & EPOLLONESHOT != 0;
            }
            epoll.cursor = fd;
        }
        Ok(ready.len() as u64)
    }
}
