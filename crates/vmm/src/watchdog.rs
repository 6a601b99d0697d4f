//! Wall-clock limits: one process-wide timer thread that interrupts `KVM_RUN` on a vCPU thread
//! whose deadline has passed.
//!
//! Interrupting works by sending the vCPU thread a real-time signal whose handler does
//! nothing: `KVM_RUN` then returns `EINTR`. A signal that lands while the thread is between
//! `KVM_RUN` calls is lost, so the timer keeps re-sending every few milliseconds until the
//! deadline is disarmed; the run loop also checks the clock after every exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often an expired deadline re-sends its signal until the vCPU thread stops.
const RESEND_INTERVAL: Duration = Duration::from_millis(5);

/// Offset above `SIGRTMIN` of the signal used to kick vCPU threads out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 2;

fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

struct Armed {
    id: u64,
    deadline: Instant,
    thread: libc::pthread_t,
    expired: Arc<AtomicBool>,
}

// SAFETY: `pthread_t` is an opaque thread id; sending it a signal from another thread is what
// pthread_kill is for. The entry is removed (by `DeadlineGuard::drop`) before the thread exits.
unsafe impl Send for Armed {}

#[derive(Default)]
struct State {
    armed: Vec<Armed>,
    next_id: u64,
}

struct Watchdog {
    state: Mutex<State>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_kick)
            .expect("registering the vCPU kick signal handler");
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("forkvm-watchdog".into())
            .spawn(move || dog.run())
            .expect("spawning the watchdog thread");
        dog
    })
}

impl Watchdog {
    fn run(&self) {
        let mut state = self.state.lock().expect("watchdog lock");
        loop {
            let now = Instant::now();
            let mut next_wake: Option<Instant> = None;
            for entry in &state.armed {
                if entry.deadline <= now {
                    entry.expired.store(true, Ordering::SeqCst);
                    // SAFETY: the thread id belongs to a live thread: entries are removed by
                    // the owning thread before it can exit. The signal's handler is a no-op.
                    unsafe { libc::pthread_kill(entry.thread, kick_signal()) };
                    next_wake = Some(
                        next_wake.map_or(now + RESEND_INTERVAL, |w| w.min(now + RESEND_INTERVAL)),
                    );
                } else {
                    next_wake = Some(next_wake.map_or(entry.deadline, |w| w.min(entry.deadline)));
                }
            }
            state = match next_wake {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(state, wait)
                        .expect("watchdog lock")
                        .0
                }
                None => self.wake.wait(state).expect("watchdog lock"),
            };
        }
    }
}

/// An armed deadline for the calling thread; dropping it disarms.
pub struct DeadlineGuard {
    id: u64,
    expired: Arc<AtomicBool>,
}

impl DeadlineGuard {
    /// Arms `deadline` for the calling thread (the thread that will call `KVM_RUN`).
    pub fn arm(deadline: Instant) -> Self {
        let dog = watchdog();
        let expired = Arc::new(AtomicBool::new(false));
        let mut state = dog.state.lock().expect("watchdog lock");
        let id = state.next_id;
        state.next_id += 1;
        state.armed.push(Armed {
            id,
            deadline,
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            expired: expired.clone(),
        });
        drop(state);
        dog.wake.notify_one();
        Self { id, expired }
    }

    /// True once the deadline has passed (the run loop then ends the sandbox).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        let dog = watchdog();
        let mut state = dog.state.lock().expect("watchdog lock");
        state.armed.retain(|a| a.id != self.id);
    }
}

/// Ends a run early from another thread (its client went away): the deadline of the run
/// it is attached to becomes now, so the run loop stops as at a timeout. A cancellation
/// before the run starts ends the run as soon as it does.
#[derive(Clone, Default)]
pub struct Cancel(Arc<Mutex<CancelState>>);

#[derive(Default)]
struct CancelState {
    cancelled: bool,
    /// The armed deadline of the run it is attached to.
    deadline: Option<u64>,
}

impl Cancel {
    pub fn cancel(&self) {
        let mut state = self.0.lock().expect("cancel lock");
        state.cancelled = true;
        if let Some(id) = state.deadline {
            expire_now(id);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.lock().expect("cancel lock").cancelled
    }

    /// Attaches to the run whose deadline is `guard`.
    pub(crate) fn attach(&self, guard: &DeadlineGuard) {
        let mut state = self.0.lock().expect("cancel lock");
        state.deadline = Some(guard.id);
        if state.cancelled {
            expire_now(guard.id);
        }
    }

    pub(crate) fn detach(&self) {
        self.0.lock().expect("cancel lock").deadline = None;
    }
}

/// Makes armed deadline `id` due now.
fn expire_now(id: u64) {
    let dog = watchdog();
    let mut state = dog.state.lock().expect("watchdog lock");
    if let Some(armed) = state.armed.iter_mut().find(|a| a.id == id) {
        armed.deadline = Instant::now();
    }
    drop(state);
    dog.wake.notify_one();
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A CPU-time budget for the calling thread (the vCPU thread): a POSIX CPU-time timer sends
/// the kick signal when the thread has used `budget` more CPU, interrupting `KVM_RUN`.
/// Dropping disarms it.
pub struct CpuBudget {
    timer: libc::timer_t,
    start: Duration,
    budget: Duration,
}

impl CpuBudget {
    /// Arms a budget of `budget` CPU time from now for the calling thread.
    pub fn arm(budget: Duration) -> std::io::Result<Self> {
        watchdog();
        // SAFETY: `sigevent` is a plain C struct for which all-zero bytes are valid; the
        // fields that matter are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the timer is deleted in Drop.
        if unsafe { libc::timer_create(libc::CLOCK_THREAD_CPUTIME_ID, &mut event, &mut timer) } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let armed = CpuBudget {
            timer,
            start: thread_cpu_time(),
            budget,
        };
        let spec = libc::itimerspec {
            // Re-fire every 5 ms of CPU in case the first kick lands between KVM_RUN calls.
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 5_000_000,
            },
            it_value: libc::timespec {
                tv_sec: budget.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(budget.subsec_nanos().max(1) as i32),
            },
        };
        // SAFETY: `timer` was created above; `spec` is valid for the call.
        if unsafe { libc::timer_settime(armed.timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(armed)
    }

    /// True once the thread has used its whole budget.
    pub fn exhausted(&self) -> bool {
        thread_cpu_time().saturating_sub(self.start) >= self.budget
    }
}

impl Drop for CpuBudget {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `arm` and is deleted exactly once, here.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// Interrupts `KVM_RUN` on the thread that made it at a chosen `CLOCK_MONOTONIC` time: the
/// thread scheduler's time slices and the deadlines of waiting threads. After firing it
/// re-fires every millisecond, in case the kick lands between `KVM_RUN` calls, until it is
/// set again.
pub struct SchedulerAlarm {
    timer: libc::timer_t,
    /// The time it is set for (`CLOCK_MONOTONIC` ns), if any.
    armed_at: Option<u64>,
}

impl SchedulerAlarm {
    /// A disarmed alarm for the calling thread.
    pub fn new() -> std::io::Result<Self> {
        watchdog();
        // SAFETY: `sigevent` is a plain C struct for which all-zero bytes are valid; the
        // fields that matter are set below.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` are valid for the call; the timer is deleted in Drop.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SchedulerAlarm {
            timer,
            armed_at: None,
        })
    }

    /// Sets the alarm for `at` (`CLOCK_MONOTONIC` ns), or disarms it (`None`).
    pub fn set(&mut self, at: Option<u64>) -> std::io::Result<()> {
        if at == self.armed_at {
            return Ok(());
        }
        let spec = match at {
            Some(at) => libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                },
                it_value: libc::timespec {
                    tv_sec: (at / 1_000_000_000) as libc::time_t,
                    // Zero would disarm the timer.
                    tv_nsec: ((at % 1_000_000_000) as libc::c_long).max(1),
                },
            },
            // SAFETY: all-zero is a valid itimerspec (it disarms).
            None => unsafe { std::mem::zeroed() },
        };
        // SAFETY: `timer` was created in `new`; `spec` is valid for the call.
        let rc = unsafe {
            libc::timer_settime(self.timer, libc::TIMER_ABSTIME, &spec, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.armed_at = at;
        Ok(())
    }
}

impl Drop for SchedulerAlarm {
    fn drop(&mut self) {
        // SAFETY: the timer was created by `new` and is deleted exactly once, here.
        unsafe { libc::timer_delete(self.timer) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupts_a_blocking_syscall() {
        let guard = DeadlineGuard::arm(Instant::now() + Duration::from_millis(20));
        // pause() returns only when a signal handler runs: the kick must arrive.
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
        assert!(guard.expired());
    }

    #[test]
    fn cpu_budget_interrupts_a_busy_thread() {
        let budget = CpuBudget::arm(Duration::from_millis(30)).unwrap();
        let started = Instant::now();
        while !budget.exhausted() {
            std::hint::spin_loop();
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        assert!(budget.exhausted());
    }

    #[test]
    fn disarmed_deadline_never_fires() {
        let guard = DeadlineGuard::arm(Instant::now() + Duration::from_millis(30));
        let expired = guard.expired.clone();
        drop(guard);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!expired.load(Ordering::SeqCst));
    }
}
