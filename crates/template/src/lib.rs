//! Building what sandboxes start from: the root filesystem image ([`rootfs`]), made once per
//! machine from Debian packages and cached.

pub mod rootfs;
