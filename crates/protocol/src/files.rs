//! Open files sent with a worker frame (`SCM_RIGHTS`): a paused session's memory travels
//! between server and worker as descriptors of memory files, never through the socket's
//! bytes. The files ride on a frame's first byte; a reader collects what arrives while it
//! reads one frame, and whoever decodes the frame takes them.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::Serialize;

use crate::worker::{WireError, encode_frame};

/// Most files one frame carries (the kernel's own limit per message is 253).
pub const MAX_FILES: usize = 240;

/// Writes `message` as one frame with `files` attached. Like `write_frame`, one frame is
/// written whole before anyone else may write (the caller holds the socket's lock).
pub fn write_frame_with_files<T: Serialize>(
    socket: &UnixStream,
    message: &T,
    files: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    use std::io::Write;
    if files.len() > MAX_FILES {
        return Err(WireError::Io(io::Error::other(format!(
            "{} files in one frame; at most {MAX_FILES} may travel together",
            files.len()
        ))));
    }
    let frame = encode_frame(message)?;
    if files.is_empty() {
        return Ok((&*socket).write_all(&frame)?);
    }
    let fds: Vec<libc::c_int> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let fds_len = std::mem::size_of_val(fds.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fds_len as u32) } as usize;
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at a control buffer of `space` bytes, room for one header and
    // `fds_len` bytes of data (CMSG_SPACE), so the first header and its data lie inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(fds_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(header), fds_len);
    }
    let sent = loop {
        // SAFETY: every pointer in `msg` refers to live buffers of the lengths it states.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    // The files went with the first byte; the rest of a large frame follows plainly.
    (&*socket).write_all(&frame[sent..])?;
    Ok(())
}

/// A socket's reading end that keeps the files arriving with what it reads.
pub struct FileReader {
    socket: UnixStream,
    received: Vec<OwnedFd>,
}

impl FileReader {
    pub fn new(socket: UnixStream) -> FileReader {
        FileReader {
            socket,
            received: Vec::new(),
        }
    }

    /// The files received since the last call (with the frame just read).
    pub fn take_files(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.received)
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        const FDS_LEN: usize = MAX_FILES * std::mem::size_of::<libc::c_int>();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(FDS_LEN as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty one; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            // SAFETY: `msg` describes `buf` and `control`, both live and of the stated
            // lengths; received descriptors are close-on-exec.
            let n =
                unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros walk
        // only the headers it wrote, and each SCM_RIGHTS header's data holds
        // `(cmsg_len - CMSG_LEN(0)) / 4` descriptors now owned by this process.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&msg);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET
                    && (*header).cmsg_type == libc::SCM_RIGHTS
                {
                    let data = libc::CMSG_DATA(header);
                    let len = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        let fd = std::ptr::read_unaligned(
                            data.add(i * std::mem::size_of::<libc::c_int>())
                                .cast::<libc::c_int>(),
                        );
                        self.received.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                header = libc::CMSG_NXTHDR(&msg, header);
            }
        }
        // A peer can send files with every read; a frame keeps at most MAX_FILES.
        self.received.truncate(MAX_FILES);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::read_frame;
    use std::io::{Seek, Write};

    #[test]
    fn files_travel_with_their_frame_only() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile_in_memory();
        file.write_all(b"layer").unwrap();
        let big = vec![7u8; 1 << 20];
        // Larger than the socket's buffer: written while the other end reads.
        let expected = big.clone();
        let writer = std::thread::spawn(move || {
            write_frame_with_files(&a, &big, &[std::os::fd::AsFd::as_fd(&file)]).unwrap();
            crate::worker::write_frame(&mut &a, &1u32).unwrap();
        });
        let mut reader = FileReader::new(b);
        let got: Vec<u8> = read_frame(&mut reader).unwrap();
        assert_eq!(got, expected);
        let files = reader.take_files();
        assert_eq!(files.len(), 1);
        let mut received = std::fs::File::from(files.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "layer");
        let next: u32 = read_frame(&mut reader).unwrap();
        assert_eq!(next, 1);
        assert!(reader.take_files().is_empty());
        writer.join().unwrap();
    }

    fn tempfile_in_memory() -> std::fs::File {
        // SAFETY: a NUL-terminated name; the descriptor returned is new and ours.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new descriptor nobody else owns.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }
}
