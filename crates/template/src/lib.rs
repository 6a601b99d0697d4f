//! What sandboxes start from: the root filesystem image ([`rootfs`]), built once per machine
//! from Debian packages, and templates: snapshots of a program parked at its first request,
//! which every fork resumes from ([`build`], [`snapshot`], [`store`]).

pub mod build;
pub mod cpu;
pub mod lock;
pub mod overlay;
pub mod packages;
pub mod paused;
pub mod rootfs;
pub mod runtime;
pub mod seal;
pub mod snapshot;
pub mod spec;
pub mod store;

pub use build::{TemplateSpec, agent_digest, build};
pub use runtime::Runtime;
pub use snapshot::{SnapshotError, SnapshotMeta};
pub use store::{StoreError, TemplateStore};
