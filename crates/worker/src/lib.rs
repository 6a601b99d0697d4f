//! Jailed worker processes. Sandboxes never run in the server process: `forkvm serve`
//! keeps a few `forkvm worker` processes (`supervisor`), each started in namespaces of its
//! own (`spawn`) and placed in a cgroup (`cgroup`); each worker jails itself (`jail`),
//! installs a seccomp allowlist (`seccomp`) and serves calls for one template (`service`).
//! The server reaches a worker through `client`, with the frames of
//! `forkvm_protocol::worker`. A worker that dies loses only its own sandboxes, and is
//! replaced.

pub mod between;
pub mod cgroup;
pub mod client;
pub mod jail;
mod output;
pub mod seccomp;
pub mod service;
pub mod spawn;
pub mod supervisor;

pub use client::{Cancellation, Connection, Tap, WorkerError};
pub use supervisor::{RemoteSession, WorkerConfig, Workers};
