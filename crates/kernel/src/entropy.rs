//! The host's CSPRNG, the source of every random byte a sandbox sees (`getrandom`,
//! `/dev/urandom`, `AT_RANDOM`) and of the server's API keys.

/// Fills `buf` from the host kernel's CSPRNG.
pub fn host_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own
        // mutably; getrandom writes at most that many bytes.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("host getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}
