//! How an ending is turned into an exit code and a precise error kind.

use std::collections::BTreeMap;

use forkvm_kernel::file::Stream;
use forkvm_protocol::Reply;
use forkvm_vmm::SandboxExit;

use forkvm_protocol::exec::{
    EXIT_INTERNAL, EXIT_OUTPUT_LIMIT, EXIT_PROCESS_LIMIT, EXIT_TIMEOUT, ErrorKind, ExecError,
    ExecLimits,
};

/// What the sandbox reported after the run, for classification.
pub(crate) struct Ending<'a> {
    pub reply: Option<Reply>,
    pub ended: Option<SandboxExit>,
    pub memory_refusals: u64,
    pub unsupported: &'a BTreeMap<&'static str, u64>,
    pub limits: &'a ExecLimits,
}

/// The exit code and error kind of an ending.
pub(crate) fn classify(ending: &Ending<'_>) -> (i32, ExecError, Option<Stream>) {
    let limits = ending.limits;
    if let Some(reply) = &ending.reply {
        let code = reply.exit_code;
        if reply.exception.as_deref() == Some("MemoryError")
            || (code != 0 && ending.memory_refusals > 0)
        {
            return (
                code,
                ExecError::new(
                    ErrorKind::MemoryLimit,
                    format!(
                        "the code exceeded its memory limit ({} MiB beyond the template)",
                        limits.memory_bytes >> 20
                    ),
                ),
                None,
            );
        }
        if code != 0 && !ending.unsupported.is_empty() {
            return (code, unsupported(ending.unsupported), None);
        }
        return (code, ExecError::none(), None);
    }
    match ending.ended.clone() {
        Some(SandboxExit::Exited(code)) => {
            let error = if code != 0 && !ending.unsupported.is_empty() {
                unsupported(ending.unsupported)
            } else {
                ExecError::none()
            };
            (code, error, None)
        }
        Some(SandboxExit::Signaled(signal)) => (
            128 + signal,
            ExecError::new(
                ErrorKind::Fault,
                format!("the process killed itself with signal {signal}"),
            ),
            None,
        ),
        Some(SandboxExit::Fault(fault)) => (
            128 + fault.signal,
            ExecError::new(ErrorKind::Fault, format!("the process crashed: {fault}")),
            None,
        ),
        Some(SandboxExit::Timeout) => (
            EXIT_TIMEOUT,
            ExecError::new(
                ErrorKind::Timeout,
                format!(
                    "stopped after the {:.3} s wall-clock limit",
                    limits.timeout.as_secs_f64()
                ),
            ),
            None,
        ),
        Some(SandboxExit::CpuTimeout) => (
            EXIT_TIMEOUT,
            ExecError::new(
                ErrorKind::Timeout,
                format!(
                    "stopped after the {:.3} s CPU-time limit",
                    limits.cpu_time.unwrap_or_default().as_secs_f64()
                ),
            ),
            None,
        ),
        Some(SandboxExit::Deadlock(why)) => (
            EXIT_TIMEOUT,
            ExecError::new(
                ErrorKind::Timeout,
                format!("stopped: the code would wait forever ({why})"),
            ),
            None,
        ),
        Some(SandboxExit::OutputLimit(hit)) => {
            let stream = match hit.stream {
                Stream::Stderr => "stderr",
                _ => "stdout",
            };
            (
                EXIT_OUTPUT_LIMIT,
                ExecError::new(
                    ErrorKind::OutputLimit,
                    format!("stopped: {stream} reached its {}-byte limit", hit.limit),
                ),
                Some(hit.stream),
            )
        }
        Some(SandboxExit::ProcessLimit(limit)) => (
            EXIT_PROCESS_LIMIT,
            ExecError::new(
                ErrorKind::ProcessLimit,
                format!("stopped: a fork passed the sandbox's limit of {limit} processes"),
            ),
            None,
        ),
        Some(SandboxExit::Internal(why)) => (
            EXIT_INTERNAL,
            ExecError::new(ErrorKind::Internal, why),
            None,
        ),
        None => (
            EXIT_INTERNAL,
            ExecError::new(ErrorKind::Internal, "the sandbox neither replied nor ended"),
            None,
        ),
    }
}

fn unsupported(calls: &BTreeMap<&'static str, u64>) -> ExecError {
    let names: Vec<String> = calls
        .iter()
        .map(|(name, n)| format!("{name} (x{n})"))
        .collect();
    ExecError::new(
        ErrorKind::UnsupportedSyscall,
        format!(
            "the code used system calls this sandbox does not provide: {}",
            names.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_kernel::OutputLimitReached;

    fn ending<'a>(
        reply: Option<Reply>,
        ended: Option<SandboxExit>,
        unsupported: &'a BTreeMap<&'static str, u64>,
        limits: &'a ExecLimits,
    ) -> Ending<'a> {
        Ending {
            reply,
            ended,
            memory_refusals: 0,
            unsupported,
            limits,
        }
    }

    fn reply(exit_code: i32, exception: Option<&str>) -> Reply {
        Reply {
            v: 1,
            exit_code,
            exception: exception.map(String::from),
        }
    }

    #[test]
    fn replies_keep_their_exit_code() {
        let limits = ExecLimits::default();
        let none = BTreeMap::new();
        let (code, error, _) = classify(&ending(Some(reply(3, None)), None, &none, &limits));
        assert_eq!((code, error.kind), (3, ErrorKind::None));
        let (code, error, _) = classify(&ending(
            Some(reply(1, Some("MemoryError"))),
            None,
            &none,
            &limits,
        ));
        assert_eq!((code, error.kind), (1, ErrorKind::MemoryLimit));
        let clone: BTreeMap<&'static str, u64> = [("clone3", 1)].into();
        let (_, error, _) = classify(&ending(
            Some(reply(1, Some("OSError"))),
            None,
            &clone,
            &limits,
        ));
        assert_eq!(error.kind, ErrorKind::UnsupportedSyscall);
        assert!(error.message.contains("clone3 (x1)"));
    }

    #[test]
    fn endings_map_to_kinds() {
        let limits = ExecLimits::default();
        let none = BTreeMap::new();
        let kind = |ended| classify(&ending(None, Some(ended), &none, &limits));
        assert_eq!(kind(SandboxExit::Exited(7)).0, 7);
        assert_eq!(kind(SandboxExit::Timeout).1.kind, ErrorKind::Timeout);
        assert_eq!(kind(SandboxExit::CpuTimeout).0, EXIT_TIMEOUT);
        let output = kind(SandboxExit::OutputLimit(OutputLimitReached {
            stream: Stream::Stdout,
            limit: 10,
        }));
        assert_eq!(
            (output.0, output.1.kind, output.2),
            (
                EXIT_OUTPUT_LIMIT,
                ErrorKind::OutputLimit,
                Some(Stream::Stdout)
            )
        );
        assert_eq!(
            kind(SandboxExit::Internal("x".into())).1.kind,
            ErrorKind::Internal
        );
    }
}
