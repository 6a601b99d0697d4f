//! The warm pool: background threads keep prepared VMs of one snapshot ready, so a fork on
//! the request path only clones process state; and a reaper thread tears finished
//! sandboxes down, so teardown (closing the VM, unmapping its memory) is off that path too.
//!
//! Memory is bounded by the pool size: a prepared VM holds no guest pages of its own (its
//! memory is an untouched private mapping of the snapshot), only KVM's per-VM kernel state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use forkvm_kernel::Console;

use crate::fork::{ForkSource, PreparedVm};
use crate::{Sandbox, Vmm, VmmError};

/// How big the pool is and how many threads fill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Prepared VMs kept ready.
    pub size: usize,
    /// Threads preparing VMs (each uses up to one core while the pool is below `size`).
    pub refill_threads: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 32,
            refill_threads: 1,
        }
    }
}

/// Counters describing the pool (monotonic unless said otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Prepared VMs ready now (a gauge).
    pub depth: usize,
    /// VMs prepared by the refill threads.
    pub prepared: u64,
    /// Time the refill threads spent preparing VMs.
    pub prepare_time: Duration,
    /// Forks served.
    pub forks: u64,
    /// Forks that found the pool empty and prepared their VM inline.
    pub misses: u64,
    /// Total time of the fork call (pool take + process clone), for the mean latency.
    pub fork_time: Duration,
    /// Sandboxes torn down by the reaper.
    pub reaped: u64,
    /// Preparations that failed (logged).
    pub errors: u64,
}

impl PoolStats {
    /// VMs prepared per second of refill-thread time (the pool's sustainable fork rate
    /// per refill thread).
    pub fn refill_rate(&self) -> f64 {
        let secs = self.prepare_time.as_secs_f64();
        if secs > 0.0 {
            self.prepared as f64 / secs
        } else {
            0.0
        }
    }
}

#[derive(Default)]
struct Counters {
    prepared: AtomicU64,
    prepare_ns: AtomicU64,
    forks: AtomicU64,
    misses: AtomicU64,
    fork_ns: AtomicU64,
    reaped: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    vmm: Arc<Vmm>,
    source: Arc<ForkSource>,
    config: PoolConfig,
    /// A request frame each prepared VM runs (and is reset from) before it is pooled.
    warmup: Option<Vec<u8>>,
    ready: Mutex<VecDeque<PreparedVm>>,
    /// Signalled when a VM is taken (refillers wake) or the pool shuts down.
    wake: Condvar,
    shutdown: AtomicBool,
    counters: Counters,
}

/// A pool of prepared VMs for one snapshot.
pub struct Pool {
    shared: Arc<Shared>,
    refillers: Vec<JoinHandle<()>>,
    reaper: Option<(Sender<Sandbox>, JoinHandle<()>)>,
}

impl Pool {
    /// Starts the refill and reaper threads. The pool fills in the background. With
    /// `warmup` (a request frame), every pooled VM first runs it and is reset to the
    /// snapshot, so it arrives warm (see `Vmm::warm_up`).
    pub fn start(
        vmm: Arc<Vmm>,
        source: Arc<ForkSource>,
        config: PoolConfig,
        warmup: Option<Vec<u8>>,
    ) -> Pool {
        let shared = Arc::new(Shared {
            vmm,
            source,
            config,
            warmup,
            ready: Mutex::new(VecDeque::with_capacity(config.size)),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let refillers = (0..config.refill_threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("forkvm-refill-{i}"))
                    .spawn(move || refill(&shared))
                    .expect("spawning a pool refill thread")
            })
            .collect();
        let (tx, rx) = channel::<Sandbox>();
        let reaper_shared = shared.clone();
        let reaper = std::thread::Builder::new()
            .name("forkvm-reaper".into())
            .spawn(move || {
                for sandbox in rx {
                    drop(sandbox);
                    reaper_shared
                        .counters
                        .reaped
                        .fetch_add(1, Ordering::Relaxed);
                }
            })
            .expect("spawning the reaper thread");
        Pool {
            shared,
            refillers,
            reaper: Some((tx, reaper)),
        }
    }

    /// The snapshot this pool forks.
    pub fn source(&self) -> &Arc<ForkSource> {
        &self.shared.source
    }

    /// A runnable sandbox parked where the snapshot was taken. Uses a prepared VM, or
    /// prepares one inline when the pool is empty (counted as a miss).
    pub fn fork(&self, console: Console) -> Result<Sandbox, VmmError> {
        let start = Instant::now();
        let taken = {
            let mut ready = self.shared.ready.lock().expect("pool lock");
            ready.pop_front()
        };
        self.shared.wake.notify_one();
        let prepared = match taken {
            Some(prepared) => prepared,
            None => {
                self.shared.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.shared.vmm.prepare_fork(&self.shared.source)?
            }
        };
        let sandbox = self
            .shared
            .vmm
            .finish_fork(prepared, &self.shared.source, console)?;
        let counters = &self.shared.counters;
        counters.forks.fetch_add(1, Ordering::Relaxed);
        counters
            .fork_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(sandbox)
    }

    /// Hands a finished sandbox to the reaper thread for teardown.
    pub fn release(&self, sandbox: Sandbox) {
        match &self.reaper {
            Some((tx, _)) => {
                if let Err(returned) = tx.send(sandbox) {
                    drop(returned.0);
                }
            }
            None => drop(sandbox),
        }
    }

    /// Blocks until the pool holds `size` prepared VMs or `timeout` passes; returns the depth.
    pub fn wait_full(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.stats().depth;
            if depth >= self.shared.config.size || Instant::now() >= deadline {
                return depth;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        PoolStats {
            depth: self.shared.ready.lock().expect("pool lock").len(),
            prepared: c.prepared.load(Ordering::Relaxed),
            prepare_time: Duration::from_nanos(c.prepare_ns.load(Ordering::Relaxed)),
            forks: c.forks.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            fork_time: Duration::from_nanos(c.fork_ns.load(Ordering::Relaxed)),
            reaped: c.reaped.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        for handle in self.refillers.drain(..) {
            let _ = handle.join();
        }
        if let Some((tx, handle)) = self.reaper.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// A refill thread: prepares VMs while the pool is below its size.
fn refill(shared: &Shared) {
    loop {
        {
            let mut ready = shared.ready.lock().expect("pool lock");
            while ready.len() >= shared.config.size && !shared.shutdown.load(Ordering::SeqCst) {
                ready = shared.wake.wait(ready).expect("pool lock");
            }
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let start = Instant::now();
        let prepared =
            shared
                .vmm
                .prepare_fork(&shared.source)
                .and_then(|vm| match &shared.warmup {
                    Some(frame) => shared.vmm.warm_up(vm, &shared.source, frame),
                    None => Ok(vm),
                });
        match prepared {
            Ok(prepared) => {
                let elapsed = start.elapsed().as_nanos() as u64;
                shared.counters.prepared.fetch_add(1, Ordering::Relaxed);
                shared
                    .counters
                    .prepare_ns
                    .fetch_add(elapsed, Ordering::Relaxed);
                shared.ready.lock().expect("pool lock").push_back(prepared);
            }
            Err(e) => {
                shared.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "preparing a pooled VM failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
