//! Mapping filesystem errors to the errno values Linux would return.

use forkvm_image::FsError;
use syscalls::Errno;

/// The errno Linux reports for `error`.
pub fn from_fs(error: FsError) -> Errno {
    match error {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::Exists => Errno::EEXIST,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Loop => Errno::ELOOP,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::Invalid => Errno::EINVAL,
        FsError::NotPermitted => Errno::EPERM,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::FileTooBig => Errno::EFBIG,
        FsError::Image(e) => {
            tracing::error!(error = %e, "corrupt image");
            Errno::EIO
        }
    }
}
