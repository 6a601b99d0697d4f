//! Starting jailed workers for the commands that run sandboxes (`serve`, `exec`): the
//! template is built if missing and verified here in full (stamping its files), then the
//! workers, which see it read-only, load it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use forkvm_protocol::exec::ExecLimits;
use forkvm_protocol::worker::Hello;
use forkvm_vmm::{PoolConfig, Vmm};
use forkvm_worker::{WorkerConfig, Workers, cgroup};

/// Builds `template` if it is missing or stale, and verifies it.
pub fn prepare(template: &str) -> Result<()> {
    let vmm = Vmm::new()?;
    crate::template::ensure(template, &vmm)?;
    crate::template::store()
        .verify(template, &vmm)
        .with_context(|| format!("loading template {template:?}"))?;
    Ok(())
}

/// `count` workers serving `template`, with `pool` warm VMs shared out among them, each in
/// a cgroup with `cgroup` limits (where the host has cgroups to give).
pub fn start(
    template: &str,
    count: usize,
    pool: PoolConfig,
    maxima: ExecLimits,
    cgroup: Option<cgroup::Limits>,
) -> Result<Arc<Workers>> {
    let count = count.max(1);
    let config = WorkerConfig {
        exe: PathBuf::from(forkvm_worker::spawn::OWN_BINARY),
        hello: Hello {
            template: template.to_string(),
            cache_dir: forkvm_template::rootfs::default_cache_dir()
                .to_string_lossy()
                .into_owned(),
            pool_depth: pool.size.div_ceil(count),
            pool_threads: pool.refill_threads,
            maxima,
        },
        count,
        cgroup,
    };
    Workers::start(config).map_err(|e| anyhow::anyhow!("starting the workers: {e}"))
}
