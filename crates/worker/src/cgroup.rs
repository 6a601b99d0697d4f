//! A cgroup per worker, so a worker that runs away (memory, threads, CPU) is stopped by
//! the host kernel before it hurts the server or other workers.
//!
//! cgroup v2 is used where the server's own cgroup can delegate the memory, pids and cpu
//! controllers; otherwise the v1 hierarchies of those controllers (hybrid hosts, like
//! Debian 12 under older container managers); where neither is writable, workers run
//! without one and the server says so once (see docs/operations.md).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// What a worker's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Host memory (anonymous, page cache and kernel memory it causes).
    pub memory_bytes: u64,
    /// Threads and processes.
    pub pids: u64,
    /// CPU time as a number of cores (`None`: unlimited).
    pub cpus: Option<f64>,
}

/// A created cgroup: one directory on v2, one per controller on v1.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    version: u8,
}

const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CPU_PERIOD_US: u64 = 100_000;

struct Mount {
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let options = right.nth(1).unwrap_or("").split(',').map(String::from);
            Some(Mount {
                point: PathBuf::from(point),
                fstype,
                options: options.collect(),
            })
        })
        .collect()
}

/// The server's own cgroup path in the hierarchy holding `controller` ("" for v2).
fn own_path(controller: &str) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then(|| PathBuf::from(path.trim_start_matches('/')))
    })
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    fs::write(dir.join(file), value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

/// Removes empty cgroups a previous server left behind (its workers are gone).
fn sweep(parent: &Path) {
    let ours = format!("forkvm-worker-{}-", std::process::id());
    if let Ok(entries) = fs::read_dir(parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("forkvm-worker-") && !name.starts_with(&ours) {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
}

impl Cgroup {
    /// A new cgroup `forkvm-worker-<name>` with `limits`, or why there is none.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup, String> {
        let name = format!("forkvm-worker-{name}");
        let mounts = mounts();
        let v2 = Self::create_v2(&mounts, &name, limits);
        match v2 {
            Ok(cgroup) => Ok(cgroup),
            Err(v2_error) => Self::create_v1(&mounts, &name, limits)
                .map_err(|v1_error| format!("cgroup v2: {v2_error}; cgroup v1: {v1_error}")),
        }
    }

    fn create_v2(mounts: &[Mount], name: &str, limits: &Limits) -> Result<Cgroup, String> {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .ok_or("no cgroup2 mount")?;
        let parent = mount.point.join(own_path("").ok_or("not in a v2 cgroup")?);
        let available = fs::read_to_string(parent.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", parent.display()))?;
        for controller in CONTROLLERS {
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(format!("controller {controller} not available"));
            }
        }
        write(&parent, "cgroup.subtree_control", "+memory +pids +cpu")
            .map_err(|e| e.to_string())?;
        sweep(&parent);
        let dir = parent.join(name);
        fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cgroup = Cgroup {
            dirs: vec![dir.clone()],
            version: 2,
        };
        let cpu = match limits.cpus {
            Some(cpus) => format!("{} {CPU_PERIOD_US}", (cpus * CPU_PERIOD_US as f64) as u64),
            None => format!("max {CPU_PERIOD_US}"),
        };
        write(&dir, "memory.max", &limits.memory_bytes.to_string())
            .and_then(|()| write(&dir, "memory.swap.max", "0").or(Ok(())))
            .and_then(|()| write(&dir, "pids.max", &limits.pids.to_string()))
            .and_then(|()| write(&dir, "cpu.max", &cpu))
            .map_err(|e| e.to_string())?;
        Ok(cgroup)
    }

    fn create_v1(mounts: &[Mount], name: &str, limits: &Limits) -> Result<Cgroup, String> {
        let mut cgroup = Cgroup {
            dirs: Vec::new(),
            version: 1,
        };
        for controller in CONTROLLERS {
            let mount = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == controller))
                .ok_or_else(|| format!("no {controller} hierarchy"))?;
            let parent = mount
                .point
                .join(own_path(controller).ok_or_else(|| format!("not in a {controller} cgroup"))?);
            sweep(&parent);
            let dir = parent.join(name);
            fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            cgroup.dirs.push(dir.clone());
            let written = match controller {
                "memory" => write(
                    &dir,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                ),
                "pids" => write(&dir, "pids.max", &limits.pids.to_string()),
                _ => match limits.cpus {
                    Some(cpus) => write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())
                        .and_then(|()| {
                            let quota = (cpus * CPU_PERIOD_US as f64) as u64;
                            write(&dir, "cpu.cfs_quota_us", &quota.to_string())
                        }),
                    None => Ok(()),
                },
            };
            written.map_err(|e| e.to_string())?;
        }
        Ok(cgroup)
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: libc::pid_t) -> io::Result<()> {
        for dir in &self.dirs {
            write(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// "v1" or "v2", and where.
    pub fn describe(&self) -> String {
        format!(
            "cgroup v{} at {}",
            self.version,
            self.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

impl Drop for Cgroup {
    /// Removes the (by now empty) cgroup.
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}
