//! Sessions between their requests: one thread per worker runs every session that has work
//! (a background process, a thread, a timer), a slice at a time, in turn.
//!
//! A slice holds the session's lock, so a request to that session waits at most one slice
//! (and the agent's return to its channel). After a slice a session rests as long as it
//! ran, so work between requests takes at most half a core per session, and one core per
//! worker however many sessions it holds.

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

/// A session's place in the rotation.
struct Turn {
    session: Arc<Mutex<Session>>,
    /// Not run again before this (`CLOCK_MONOTONIC` ns): its rest after a slice.
    rest_until: u64,
}

/// The driver's life: runs forever, taking the live sessions from `sessions` each round.
pub fn drive(sessions: impl Fn() -> Vec<Arc<Mutex<Session>>>, wakeup: &Wakeup) -> ! {
    let mut turns: Vec<Turn> = Vec::new();
    loop {
        let live = sessions();
        turns.retain(|t| live.iter().any(|s| Arc::ptr_eq(s, &t.session)));
        for session in live {
            if !turns.iter().any(|t| Arc::ptr_eq(&t.session, &session)) {
                turns.push(Turn {
                    session,
                    rest_until: 0,
                });
            }
        }
        let mut next: Option<u64> = None;
        for turn in &mut turns {
            // A session busy with a call is looked at again when the call ends (`notify`).
            let Ok(mut session) = turn.session.try_lock() else {
                continue;
            };
            let Some(due) = session.work_due() else {
                continue;
            };
            let now = monotonic_ns();
            let due = due.max(turn.rest_until);
            if due <= now {
                let started = monotonic_ns();
                session.run_between_requests(SLICE);
                let ended = monotonic_ns();
                turn.rest_until = ended + (ended - started);
                if let Some(due) = session.work_due() {
                    let due = due.max(turn.rest_until);
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        wakeup.wait(next);
    }
}
