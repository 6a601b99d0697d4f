//! Recycling: a VM that served a tenant's request is reset to the snapshot off the request
//! path and kept for that same tenant's next request.
//!
//! A new VM costs about 7 ms of CPU before it is warm (shadow-paging faults on kvm_pvm); a
//! reset costs about 1 ms and keeps the warmth. The reset is exact (memory byte-for-byte,
//! registers), so nothing of the previous request's data survives it. A VM still goes back
//! only to the *same* tenant: which pages are warm is itself a trace of what the previous
//! code touched, and timing could reveal it to a stranger.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use forkvm_vmm::{ForkSource, PreparedVm, Sandbox, Vmm};

/// A fork that made more memory than this its own is torn down instead of recycled.
pub const MAX_RECYCLE_PRIVATE_BYTES: u64 = 16 << 20;
/// Sandboxes waiting for a reset. When the reset thread falls behind, more are torn down
/// instead: recycling is an optimization, and a backlog would hold their memory.
const QUEUE: usize = 8;

/// How many reset VMs to keep.
#[derive(Debug, Clone, Copy)]
pub struct RecycleConfig {
    /// Per tenant.
    pub per_tenant: usize,
    /// Across all tenants of one template.
    pub total: usize,
}

impl Default for RecycleConfig {
    fn default() -> Self {
        Self {
            per_tenant: 4,
            total: 64,
        }
    }
}

struct Bins {
    by_tenant: HashMap<String, VecDeque<PreparedVm>>,
    /// Tenants in the order their last VM was kept (oldest first), to evict when full.
    order: VecDeque<String>,
    count: usize,
}

/// Reset VMs kept per tenant, and the thread that resets them.
pub struct Recycler {
    bins: Arc<Mutex<Bins>>,
    sender: Option<SyncSender<(String, Sandbox)>>,
    worker: Option<JoinHandle<()>>,
}

impl Recycler {
    pub fn start(vmm: Arc<Vmm>, source: Arc<ForkSource>, config: RecycleConfig) -> Recycler {
        let bins = Arc::new(Mutex::new(Bins {
            by_tenant: HashMap::new(),
            order: VecDeque::new(),
            count: 0,
        }));
        let (sender, receiver) = sync_channel::<(String, Sandbox)>(QUEUE);
        let kept = bins.clone();
        let worker = std::thread::Builder::new()
            .name("forkvm-recycle".into())
            .spawn(move || {
                for (tenant, sandbox) in receiver {
                    match vmm.reset_fork(sandbox, &source, MAX_RECYCLE_PRIVATE_BYTES) {
                        Ok(Some(vm)) => keep(&kept, &tenant, vm, config),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "resetting a VM for reuse failed"),
                    }
                }
            })
            .expect("spawning the recycle thread");
        Recycler {
            bins,
            sender: Some(sender),
            worker: Some(worker),
        }
    }

    /// A reset VM that last served `tenant`, if one is ready.
    pub fn take(&self, tenant: &str) -> Option<PreparedVm> {
        let mut bins = self.bins.lock().expect("recycle lock");
        let bin = bins.by_tenant.get_mut(tenant)?;
        let vm = bin.pop_back()?;
        if bin.is_empty() {
            bins.by_tenant.remove(tenant);
            bins.order.retain(|t| t != tenant);
        }
        bins.count -= 1;
        Some(vm)
    }

    /// Hands a sandbox that served `tenant` (and is parked again) over to be reset. Returns
    /// it when the reset thread is too far behind (the caller tears it down instead).
    pub fn give_back(&self, tenant: &str, sandbox: Sandbox) -> Option<Sandbox> {
        let sender = self.sender.as_ref()?;
        match sender.try_send((tenant.to_string(), sandbox)) {
            Ok(()) => None,
            Err(TrySendError::Full((_, sandbox)) | TrySendError::Disconnected((_, sandbox))) => {
                Some(sandbox)
            }
        }
    }

    /// Reset VMs kept now.
    pub fn kept(&self) -> usize {
        self.bins.lock().expect("recycle lock").count
    }
}

fn keep(bins: &Mutex<Bins>, tenant: &str, vm: PreparedVm, config: RecycleConfig) {
    let mut bins = bins.lock().expect("recycle lock");
    let mut evicted = Vec::new();
    // Full: evict from the tenants that kept a VM least recently.
    while bins.count >= config.total {
        let Some(oldest) = bins.order.pop_front() else {
            break;
        };
        if let Some(bin) = bins.by_tenant.remove(&oldest) {
            bins.count -= bin.len();
            evicted.extend(bin);
        }
    }
    let bin = bins.by_tenant.entry(tenant.to_string()).or_default();
    if bin.len() >= config.per_tenant {
        evicted.extend(bin.pop_front());
    }
    bin.push_back(vm);
    bins.count = bins.by_tenant.values().map(VecDeque::len).sum();
    bins.order.retain(|t| t != tenant);
    bins.order.push_back(tenant.to_string());
    drop(bins);
    // Teardown (closing the VM, unmapping memory) happens outside the lock.
    drop(evicted);
}

impl Drop for Recycler {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
