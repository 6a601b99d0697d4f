//! Sessions between their requests: one thread per worker runs every session that has work
//! (a background process, a thread, a timer), a slice at a time, in turn.
//!
//! A slice holds the session's lock, so a request to that session waits at most one slice
//! (and the agent's return to its channel). After a slice a session rests as long as it
//! ran, so work between requests takes at most half a core per session, and one core per
//! worker however many sessions it holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use forkvm_engine::Session;
use forkvm_kernel::threads::monotonic_ns;

/// How long one session runs before the next gets its turn.
pub const SLICE: Duration = Duration::from_millis(10);

/// Wakes the driver when a session may have new work (a request ended, a session was made).
#[derive(Default)]
pub struct Wakeup {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl Wakeup {
    pub fn notify(&self) {
        *self.pending.lock().expect("wakeup lock") = true;
        self.cond.notify_one();
    }

    /// Waits until notified or until `until` (`CLOCK_MONOTONIC` ns), if given.
    fn wait(&self, until: Option<u64>) {
        let mut pending = self.pending.lock().expect("wakeup lock");
        if !*pending {
            pending = match until {
                Some(until) => {
                    let wait = Duration::from_nanos(until.saturating_sub(monotonic_ns()));
                    self.cond
                        .wait_timeout(pending, wait)
                        .expect("wakeup lock")
                        .0
                }
                None => self.cond.wait(pending).expect("wakeup lock"),
            };
        }
        *pending = false;
    }
}

/// The driver's life: runs forever, taking the live sessions from `sessions` each round.
/// Each session's rest is kept by its address (the `Arc` the worker holds).
pub fn drive(sessions: impl Fn() -> Vec<Arc<Mutex<Session>>>, wakeup: &Wakeup) -> ! {
    let mut rest_until: HashMap<usize, u64> = HashMap::new();
    loop {
        let live = sessions();
        let key = |session: &Arc<Mutex<Session>>| Arc::as_ptr(session) as usize;
        let keys: HashSet<usize> = live.iter().map(key).collect();
        rest_until.retain(|k, _| keys.contains(k));
        let mut next: Option<u64> = None;
        for session in &live {
            // A session busy with a call is looked at again when the call ends (`notify`).
            let Ok(mut locked) = session.try_lock() else {
                continue;
            };
            let Some(due) = locked.work_due() else {
                continue;
            };
            let rest = rest_until.entry(key(session)).or_insert(0);
            let mut due = due.max(*rest);
            if due <= monotonic_ns() {
                let started = monotonic_ns();
                locked.run_between_requests(SLICE);
                let ended = monotonic_ns();
                *rest = ended + (ended - started);
                let Some(again) = locked.work_due() else {
                    continue;
                };
                due = again.max(*rest);
            }
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        // Not held while waiting: a session the worker drops meanwhile (deleted, paused)
        // must free its VM now, not when the driver next wakes.
        drop(live);
        wakeup.wait(next);
    }
}
