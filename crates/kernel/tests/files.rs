//! File and path syscalls against the test image and its writable overlay.

mod common;

use common::{BIG_LEN, HELLO, Harness, INNER, err, parse_dirents};

const RDONLY: i32 = libc::O_RDONLY;

#[test]
fn open_read_pread_lseek_close_on_image_file() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", RDONLY, 0);
    assert_eq!(fd, 3, "lowest free descriptor after stdio");
    assert_eq!(h.read_fd(fd, 5).unwrap(), b"hello");
    assert_eq!(h.read_fd(fd, 100).unwrap(), &HELLO[5..]);
    assert_eq!(h.read_fd(fd, 100).unwrap(), b"", "end of file");

    let buf = h.at(0x4000);
    let n = h.sys(libc::SYS_pread64, &[fd as u64, buf, 6, 7]);
    assert_eq!(n, 6);
    assert_eq!(h.peek(buf, 6), b"forkvm");
    assert_eq!(
        h.sys(libc::SYS_lseek, &[fd as u64, 0, libc::SEEK_CUR as u64]),
        HELLO.len() as i64,
        "pread leaves the offset alone"
    );
    assert_eq!(
        h.sys(libc::SYS_pread64, &[fd as u64, buf, 6, u64::MAX]),
        err(libc::EINVAL),
        "negative pread offset"
    );

    assert_eq!(
        h.sys(libc::SYS_lseek, &[fd as u64, 7, libc::SEEK_SET as u64]),
        7
    );
    assert_eq!(h.read_fd(fd, 6).unwrap(), b"forkvm");
    let minus_three = (-3i64) as u64;
    assert_eq!(
        h.sys(
            libc::SYS_lseek,
            &[fd as u64, minus_three, libc::SEEK_END as u64]
        ),
        HELLO.len() as i64 - 3
    );
    assert_eq!(h.read_fd(fd, 10).unwrap(), b"vm\n");
    assert_eq!(
        h.sys(
            libc::SYS_lseek,
            &[fd as u64, minus_three, libc::SEEK_SET as u64]
        ),
        err(libc::EINVAL)
    );
    assert_eq!(
        h.sys(libc::SYS_lseek, &[1, 0, libc::SEEK_SET as u64]),
        err(libc::ESPIPE),
        "stdout is not seekable"
    );

    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), 0);
    assert_eq!(h.read_fd(fd, 1), Err(err(libc::EBADF)));
    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), err(libc::EBADF));
}

#[test]
fn big_image_file_reads_whole() {
    let mut h = Harness::new();
    let fd = h.open("/data/big.bin", RDONLY, 0);
    assert!(fd >= 0);
    assert_eq!(h.fstat(fd).unwrap().size, BIG_LEN as u64);
    let buf = h.at(0);
    let n = h.sys(libc::SYS_read, &[fd as u64, buf, 0xC000]);
    assert_eq!(n, BIG_LEN as i64, "a short read at end of file");
    let expected: Vec<u8> = (0..BIG_LEN).map(common::big_byte).collect();
    assert_eq!(h.peek(buf, BIG_LEN), expected);
}

#[test]
fn write_to_tmp_reads_back_and_fstat_sees_size() {
    let mut h = Harness::new();
    let flags = libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC;
    let fd = h.open("/tmp/out.txt", flags, 0o666);
    assert_eq!(fd, 3);
    assert_eq!(h.write_fd(fd, b"first line\n"), 11);
    assert_eq!(h.write_fd(fd, b"second\n"), 7);
    let st = h.fstat(fd).unwrap();
    assert_eq!(st.size, 18);
    assert_eq!(st.mode, libc::S_IFREG | 0o644, "umask 022 applied");
    assert_eq!(
        h.sys(libc::SYS_lseek, &[fd as u64, 0, libc::SEEK_SET as u64]),
        0
    );
    assert_eq!(h.read_fd(fd, 100).unwrap(), b"first line\nsecond\n");

    let data = h.at(0x4000);
    h.poke(data, b"XY");
    assert_eq!(h.sys(libc::SYS_pwrite64, &[fd as u64, data, 2, 30]), 2);
    assert_eq!(h.fstat(fd).unwrap().size, 32, "pwrite past the end extends");
    let buf = h.at(0x5000);
    assert_eq!(h.sys(libc::SYS_pread64, &[fd as u64, buf, 14, 18]), 14);
    assert_eq!(h.peek(buf, 14), b"\0\0\0\0\0\0\0\0\0\0\0\0XY");
    h.sys(libc::SYS_close, &[fd as u64]);

    let st = h.stat("/tmp/out.txt", 0).unwrap();
    assert_eq!(st.size, 32);
}

#[test]
fn write_to_read_only_descriptor_is_ebadf() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", RDONLY, 0);
    assert_eq!(h.write_fd(fd, b"x"), err(libc::EBADF));
    assert_eq!(
        h.read_fd(1, 1),
        Err(err(libc::EBADF)),
        "stdout is write-only"
    );
}

#[test]
fn open_flag_errors() {
    let mut h = Harness::new();
    let excl = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
    assert_eq!(h.open("/etc/hello.txt", excl, 0o644), err(libc::EEXIST));
    let fd = h.open("/tmp/new", excl, 0o644);
    assert_eq!(fd, 3);
    assert_eq!(h.open("/tmp/new", excl, 0o644), err(libc::EEXIST));
    assert_eq!(
        h.open("/etc/hello.txt", libc::O_RDONLY | libc::O_DIRECTORY, 0),
        err(libc::ENOTDIR)
    );
    assert_eq!(h.open("/etc/missing", RDONLY, 0), err(libc::ENOENT));
    assert_eq!(h.open("/nodir/file", RDONLY, 0), err(libc::ENOENT));
    assert_eq!(
        h.open("/etc/hello.txt/x", RDONLY, 0),
        err(libc::ENOTDIR),
        "a file used as a directory"
    );
    assert_eq!(h.open("/etc", libc::O_WRONLY, 0), err(libc::EISDIR));
    assert_eq!(
        h.open("/etc/link", RDONLY | libc::O_NOFOLLOW, 0),
        err(libc::ELOOP)
    );
    assert_eq!(h.open("", RDONLY, 0), err(libc::ENOENT), "empty path");
}

#[test]
fn open_then_unlink_keeps_the_data_readable() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", RDONLY, 0);
    assert!(fd >= 0);
    let path = h.cstr(0x100, "/etc/hello.txt");
    assert_eq!(h.sys(libc::SYS_unlink, &[path]), 0);
    assert_eq!(h.stat("/etc/hello.txt", 0), Err(err(libc::ENOENT)));
    assert_eq!(h.open("/etc/hello.txt", RDONLY, 0), err(libc::ENOENT));
    let path = h.cstr(0x100, "/etc/hello.txt");
    assert_eq!(h.sys(libc::SYS_unlink, &[path]), err(libc::ENOENT));
    assert_eq!(
        h.read_fd(fd, 100).unwrap(),
        HELLO,
        "open descriptor outlives the name"
    );
    let dir = h.cstr(0x100, "/etc");
    assert_eq!(h.sys(libc::SYS_unlink, &[dir]), err(libc::EISDIR));
}

#[test]
fn mkdir_rename_rmdir() {
    let mut h = Harness::new();
    let d = h.cstr(0x100, "/tmp/d");
    assert_eq!(h.sys(libc::SYS_mkdir, &[d, 0o777]), 0);
    assert_eq!(h.sys(libc::SYS_mkdir, &[d, 0o777]), err(libc::EEXIST));
    let st = h.stat("/tmp/d", 0).unwrap();
    assert_eq!(st.mode, libc::S_IFDIR | 0o755);

    let f = h.open("/tmp/d/f", libc::O_CREAT | libc::O_WRONLY, 0o600);
    assert_eq!(h.write_fd(f, b"moved"), 5);
    h.sys(libc::SYS_close, &[f as u64]);

    let d = h.cstr(0x100, "/tmp/d");
    assert_eq!(h.sys(libc::SYS_rmdir, &[d]), err(libc::ENOTEMPTY));
    let e = h.cstr(0x200, "/tmp/e");
    assert_eq!(h.sys(libc::SYS_rename, &[d, e]), 0);
    assert_eq!(h.stat("/tmp/d", 0), Err(err(libc::ENOENT)));
    let fd = h.open("/tmp/e/f", RDONLY, 0);
    assert_eq!(h.read_fd(fd, 10).unwrap(), b"moved");
    h.sys(libc::SYS_close, &[fd as u64]);

    // Rename a file over another: the target is replaced.
    let from = h.cstr(0x100, "/tmp/e/f");
    let to = h.cstr(0x200, "/etc/hello.txt");
    assert_eq!(h.sys(libc::SYS_rename, &[from, to]), 0);
    assert_eq!(h.stat("/etc/hello.txt", 0).unwrap().size, 5);

    let e = h.cstr(0x100, "/tmp/e");
    assert_eq!(h.sys(libc::SYS_rmdir, &[e]), 0);
    assert_eq!(h.stat("/tmp/e", 0), Err(err(libc::ENOENT)));
    let file = h.cstr(0x100, "/etc/hello.txt");
    assert_eq!(h.sys(libc::SYS_rmdir, &[file]), err(libc::ENOTDIR));
    let missing = h.cstr(0x100, "/tmp/missing/x");
    assert_eq!(h.sys(libc::SYS_mkdir, &[missing, 0o755]), err(libc::ENOENT));
}

#[test]
fn getdents64_lists_dot_dotdot_and_entries() {
    let mut h = Harness::new();
    let fd = h.open("/bin", libc::O_RDONLY | libc::O_DIRECTORY, 0);
    assert_eq!(fd, 3);
    let buf = h.at(0x1000);
    let n = h.sys(libc::SYS_getdents64, &[fd as u64, buf, 4096]);
    assert!(n > 0, "getdents64: {n}");
    let entries = parse_dirents(&h.peek(buf, n as usize));
    let summary: Vec<(&str, u8)> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        summary,
        vec![
            (".", libc::DT_DIR),
            ("..", libc::DT_DIR),
            ("dir", libc::DT_DIR),
            ("tiny", libc::DT_REG),
        ]
    );
    let dir_ino = h.stat("/bin/dir", 0).unwrap().ino;
    assert_eq!(entries[2].ino, dir_ino, "d_ino matches stat");
    assert_eq!(entries[0].ino, h.stat("/bin", 0).unwrap().ino);
    assert_eq!(entries[1].ino, h.stat("/", 0).unwrap().ino);
    assert_eq!(
        h.sys(libc::SYS_getdents64, &[fd as u64, buf, 4096]),
        0,
        "end of directory"
    );

    // A buffer too small for even one record.
    let fd2 = h.open("/bin", libc::O_RDONLY | libc::O_DIRECTORY, 0);
    assert_eq!(
        h.sys(libc::SYS_getdents64, &[fd2 as u64, buf, 8]),
        err(libc::EINVAL)
    );
    // One record at a time.
    assert_eq!(h.sys(libc::SYS_getdents64, &[fd2 as u64, buf, 24]), 24);
    assert_eq!(parse_dirents(&h.peek(buf, 24))[0].name, ".");

    let file = h.open("/etc/hello.txt", RDONLY, 0);
    assert_eq!(
        h.sys(libc::SYS_getdents64, &[file as u64, buf, 4096]),
        err(libc::ENOTDIR)
    );
}

#[test]
fn getdents64_sees_overlay_changes() {
    let mut h = Harness::new();
    let f = h.open("/bin/new", libc::O_CREAT | libc::O_WRONLY, 0o644);
    assert!(f >= 0);
    let tiny = h.cstr(0x100, "/bin/tiny");
    assert_eq!(h.sys(libc::SYS_unlink, &[tiny]), 0);
    let fd = h.open("/bin", libc::O_RDONLY | libc::O_DIRECTORY, 0);
    let buf = h.at(0x1000);
    let n = h.sys(libc::SYS_getdents64, &[fd as u64, buf, 4096]);
    let mut names: Vec<String> = parse_dirents(&h.peek(buf, n as usize))
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(names, vec![".", "..", "dir", "new"]);
}

#[test]
fn readlink_and_stat_nofollow() {
    let mut h = Harness::new();
    let link = h.cstr(0x100, "/etc/link");
    let buf = h.at(0x1000);
    assert_eq!(h.sys(libc::SYS_readlink, &[link, buf, 256]), 9);
    assert_eq!(h.peek(buf, 9), b"hello.txt");
    assert_eq!(
        h.sys(libc::SYS_readlink, &[link, buf, 4]),
        4,
        "truncated to the buffer"
    );
    let file = h.cstr(0x100, "/etc/hello.txt");
    assert_eq!(
        h.sys(libc::SYS_readlink, &[file, buf, 256]),
        err(libc::EINVAL)
    );

    let followed = h.stat("/etc/link", 0).unwrap();
    assert_eq!(followed.file_type(), libc::S_IFREG);
    assert_eq!(followed.size, HELLO.len() as u64);
    let own = h.stat("/etc/link", libc::AT_SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(own.file_type(), libc::S_IFLNK);
    assert_eq!(own.size, 9);
    assert_ne!(own.ino, followed.ino);
    assert_eq!(
        h.stat("/etc/link", 0x4000_0000),
        Err(err(libc::EINVAL)),
        "bad flags"
    );

    // A new symlink in the overlay.
    let target = h.cstr(0x100, "/bin/dir");
    let name = h.cstr(0x200, "/tmp/dirlink");
    assert_eq!(h.sys(libc::SYS_symlink, &[target, name]), 0);
    assert_eq!(h.sys(libc::SYS_readlink, &[name, buf, 256]), 8);
    assert_eq!(h.peek(buf, 8), b"/bin/dir");
    let fd = h.open("/tmp/dirlink/inner.txt", RDONLY, 0);
    assert_eq!(h.read_fd(fd, 100).unwrap(), INNER);
}

#[test]
fn getcwd_and_chdir() {
    let mut h = Harness::new();
    let buf = h.at(0x1000);
    assert_eq!(h.sys(libc::SYS_getcwd, &[buf, 256]), 2);
    assert_eq!(h.peek(buf, 2), b"/\0");
    let dir = h.cstr(0x100, "/bin/dir/");
    assert_eq!(h.sys(libc::SYS_chdir, &[dir]), 0);
    assert_eq!(h.sys(libc::SYS_getcwd, &[buf, 256]), 9);
    assert_eq!(h.peek(buf, 9), b"/bin/dir\0");
    assert_eq!(h.sys(libc::SYS_getcwd, &[buf, 5]), err(libc::ERANGE));

    let fd = h.open("inner.txt", RDONLY, 0);
    assert_eq!(
        h.read_fd(fd, 100).unwrap(),
        INNER,
        "relative to the new cwd"
    );
    let up = h.cstr(0x100, "../../etc");
    assert_eq!(h.sys(libc::SYS_chdir, &[up]), 0);
    assert_eq!(h.sys(libc::SYS_getcwd, &[buf, 256]), 5);
    assert_eq!(h.peek(buf, 5), b"/etc\0");

    let file = h.cstr(0x100, "hello.txt");
    assert_eq!(h.sys(libc::SYS_chdir, &[file]), err(libc::ENOTDIR));
    let missing = h.cstr(0x100, "/nope");
    assert_eq!(h.sys(libc::SYS_chdir, &[missing]), err(libc::ENOENT));
    assert_eq!(
        h.sys(libc::SYS_getcwd, &[buf, 256]),
        5,
        "failed chdir keeps cwd"
    );
}

#[test]
fn dup_and_dup2_share_the_offset() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", RDONLY, 0);
    let copy = h.sys(libc::SYS_dup, &[fd as u64]);
    assert_eq!(copy, 4);
    assert_eq!(h.read_fd(fd, 5).unwrap(), b"hello");
    assert_eq!(
        h.sys(libc::SYS_lseek, &[copy as u64, 0, libc::SEEK_CUR as u64]),
        5
    );
    assert_eq!(h.sys(libc::SYS_dup2, &[fd as u64, 10]), 10);
    assert_eq!(h.read_fd(10, 2).unwrap(), b", ");
    assert_eq!(h.read_fd(copy, 6).unwrap(), b"forkvm");

    // dup2 onto an open descriptor closes it first; closing one copy keeps the others.
    let other = h.open("/bin/dir/inner.txt", RDONLY, 0);
    assert_eq!(other, 5);
    assert_eq!(h.sys(libc::SYS_dup2, &[fd as u64, other as u64]), other);
    assert_eq!(h.read_fd(other, 100).unwrap(), b"\n");
    assert_eq!(h.sys(libc::SYS_close, &[fd as u64]), 0);
    assert_eq!(
        h.sys(libc::SYS_lseek, &[copy as u64, 0, libc::SEEK_SET as u64]),
        0
    );
    assert_eq!(h.read_fd(10, 5).unwrap(), b"hello");

    assert_eq!(h.sys(libc::SYS_dup2, &[10, 10]), 10, "dup2 onto itself");
    assert_eq!(h.sys(libc::SYS_dup3, &[10, 10, 0]), err(libc::EINVAL));
    assert_eq!(h.sys(libc::SYS_dup, &[99]), err(libc::EBADF));
    assert_eq!(h.sys(libc::SYS_dup2, &[99, 3]), err(libc::EBADF));
}

#[test]
fn fcntl_descriptor_and_status_flags() {
    let mut h = Harness::new();
    let fd = h.open("/etc/hello.txt", libc::O_RDONLY | libc::O_CLOEXEC, 0) as u64;
    let getfd = libc::F_GETFD as u64;
    assert_eq!(
        h.sys(libc::SYS_fcntl, &[fd, getfd]),
        libc::FD_CLOEXEC as i64
    );
    assert_eq!(h.sys(libc::SYS_fcntl, &[fd, libc::F_SETFD as u64, 0]), 0);
    assert_eq!(h.sys(libc::SYS_fcntl, &[fd, getfd]), 0);
    assert_eq!(h.sys(libc::SYS_fcntl, &[fd, libc::F_GETFL as u64]), 0);

    let rw = h.open(
        "/tmp/f",
        libc::O_CREAT | libc::O_RDWR | libc::O_APPEND,
        0o644,
    ) as u64;
    let getfl = libc::F_GETFL as u64;
    let wanted = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK;
    let flags = h.sys(libc::SYS_fcntl, &[rw, getfl]) as i32 & wanted;
    assert_eq!(flags, libc::O_RDWR | libc::O_APPEND);
    let setfl = libc::F_SETFL as u64;
    assert_eq!(
        h.sys(libc::SYS_fcntl, &[rw, setfl, libc::O_NONBLOCK as u64]),
        0
    );
    let flags = h.sys(libc::SYS_fcntl, &[rw, getfl]) as i32 & wanted;
    assert_eq!(
        flags,
        libc::O_RDWR | libc::O_NONBLOCK,
        "access mode is kept"
    );

    let dup = h.sys(libc::SYS_fcntl, &[fd, libc::F_DUPFD_CLOEXEC as u64, 20]);
    assert_eq!(dup, 20);
    assert_eq!(
        h.sys(libc::SYS_fcntl, &[20, getfd]),
        libc::FD_CLOEXEC as i64
    );
    assert_eq!(h.sys(libc::SYS_fcntl, &[99, getfd]), err(libc::EBADF));
    assert_eq!(h.sys(libc::SYS_fcntl, &[fd, 9999]), err(libc::EINVAL));
}

#[test]
fn ioctl_tcgets_is_enotty() {
    let mut h = Harness::new();
    let termios = h.at(0x1000);
    for fd in [0u64, 1, 2] {
        assert_eq!(
            h.sys(libc::SYS_ioctl, &[fd, libc::TCGETS, termios]),
            err(libc::ENOTTY)
        );
    }
    let fd = h.open("/etc/hello.txt", RDONLY, 0) as u64;
    assert_eq!(
        h.sys(libc::SYS_ioctl, &[fd, libc::TIOCGWINSZ, termios]),
        err(libc::ENOTTY)
    );
    assert_eq!(h.sys(libc::SYS_ioctl, &[fd, libc::FIONREAD, termios]), 0);
    assert_eq!(h.peek(termios, 4), (HELLO.len() as i32).to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_ioctl, &[77, libc::TCGETS, termios]),
        err(libc::EBADF)
    );
}

#[test]
fn path_without_nul_is_enametoolong() {
    let mut h = Harness::new();
    let path = h.at(0x1000);
    h.poke(path, &[b'a'; 8192]);
    let open = |h: &mut Harness| {
        h.sys(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, path, libc::O_RDONLY as u64, 0],
        )
    };
    assert_eq!(open(&mut h), err(libc::ENAMETOOLONG));

    // 4095 bytes plus the NUL is the longest path Linux accepts; one more is too long.
    let mut longest = b"/".to_vec();
    longest.extend(b"a/".repeat(2047));
    assert_eq!(longest.len(), 4095);
    longest.push(0);
    h.poke(path, &longest);
    assert_eq!(open(&mut h), err(libc::ENOENT));
    let mut too_long = b"/".to_vec();
    too_long.extend(b"a/".repeat(2047));
    too_long.extend(b"a\0");
    h.poke(path, &too_long);
    assert_eq!(open(&mut h), err(libc::ENAMETOOLONG));

    // A string that runs into unmapped memory before any NUL.
    let end = h.scratch + common::SCRATCH_LEN;
    h.poke(end - 16, &[b'b'; 16]);
    assert_eq!(
        h.sys(libc::SYS_openat, &[libc::AT_FDCWD as u64, end - 16, 0, 0]),
        err(libc::EFAULT)
    );
}

#[test]
fn extended_attributes_are_unsupported_and_mknod_makes_no_devices() {
    let mut h = Harness::new();
    let path = h.cstr(0, "/etc/hello.txt");
    let buf = h.at(0x1000);
    assert_eq!(
        h.sys(libc::SYS_listxattr, &[path, buf, 256]),
        err(libc::EOPNOTSUPP),
        "what shutil.copy2 expects of a filesystem without them"
    );
    assert_eq!(
        h.sys(libc::SYS_getxattr, &[path, buf, buf, 16]),
        err(libc::EOPNOTSUPP)
    );
    let missing = h.cstr(0, "/missing");
    assert_eq!(
        h.sys(libc::SYS_getxattr, &[missing, buf, buf, 16]),
        err(libc::ENOENT)
    );
    assert_eq!(
        h.sys(libc::SYS_fsetxattr, &[99, buf, buf, 1, 0]),
        err(libc::EBADF)
    );
    let file = h.cstr(0, "/tmp/made");
    let mode = u64::from(libc::S_IFREG | 0o600);
    assert_eq!(h.sys(libc::SYS_mknod, &[file, mode, 0]), 0);
    assert_eq!(h.stat("/tmp/made", 0).unwrap().mode, libc::S_IFREG | 0o600);
    assert_eq!(h.sys(libc::SYS_mknod, &[file, mode, 0]), err(libc::EEXIST));
    let device = h.cstr(0, "/tmp/null");
    let device_mode = u64::from(libc::S_IFCHR | 0o600);
    assert_eq!(
        h.sys(libc::SYS_mknod, &[device, device_mode, 0x103]),
        err(libc::EPERM),
        "device nodes need a privilege the sandbox lacks"
    );
}
