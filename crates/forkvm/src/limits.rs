//! The host process's own resource limits.

/// Raises this process's descriptor limit (`RLIMIT_NOFILE`) to at least `wanted` if the
/// system allows it: the soft limit up to the hard one, and the hard one too when we may
/// (root, up to `fs.nr_open`). Returns the soft limit in force afterwards.
pub fn raise_descriptor_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur >= wanted {
        return limit.rlim_cur;
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    let raised = libc::rlimit {
        rlim_cur: wanted.min(ceiling),
        rlim_max: limit.rlim_max.max(wanted.min(ceiling)),
    };
    // SAFETY: setrlimit reads only the struct we pass; failure leaves the limit as it was.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return raised.rlim_cur;
    }
    // Not allowed to raise the hard limit: go as far as it.
    let soft = libc::rlimit {
        rlim_cur: wanted.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        return soft.rlim_cur;
    }
    limit.rlim_cur
}
