//! A sample source tree exercising every kind of entry the image format handles.

use std::ffi::CString;
use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use forkvm_image::{Image, build_image};

/// Size of `big.bin`: above the 16 KiB alignment threshold and not a page multiple.
pub const BIG_LEN: usize = 20_000;
/// A name of exactly 255 bytes.
pub fn long_name() -> String {
    "n".repeat(255)
}

/// Recognisable contents for `big.bin`.
pub fn big_contents() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

/// Writes the sample tree under `root`:
///
/// ```text
/// hello.txt            "hello world\n", 0644, mtime 1_600_000_000.123456789
/// big.bin              BIG_LEN bytes
/// bin/tool             small ELF-looking file, 0755
/// bin/setuid           04755
/// data/nested/deep/file.txt
/// empty/
/// hard1, hard2         hard links to one file
/// "sp ace & ünï"       unusual name
/// nnn…(255)            longest name
/// abs_link -> /hello.txt, rel_link -> data/nested, dir_link -> bin/
/// escape -> ../../../../hello.txt, dangling -> nowhere
/// loop_a -> loop_b, loop_b -> loop_a
/// fifo                 skipped by the builder
/// ```
pub fn write_sample_tree(root: &Path) {
    fs::write(root.join("hello.txt"), b"hello world\n").unwrap();
    fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let mtime = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    File::options()
        .write(true)
        .open(root.join("hello.txt"))
        .unwrap()
        .set_times(FileTimes::new().set_modified(mtime))
        .unwrap();
    fs::write(root.join("big.bin"), big_contents()).unwrap();
    fs::create_dir_all(root.join("bin")).unwrap();
    let mut elf = b"\x7fELF".to_vec();
    elf.extend_from_slice(&[2; 100]);
    fs::write(root.join("bin/tool"), &elf).unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("bin/setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("bin/setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir_all(root.join("data/nested/deep")).unwrap();
    fs::write(root.join("data/nested/deep/file.txt"), b"deep").unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::write(root.join("hard1"), b"shared").unwrap();
    fs::hard_link(root.join("hard1"), root.join("hard2")).unwrap();
    fs::write(root.join("sp ace & ünï"), b"odd").unwrap();
    fs::write(root.join(long_name()), b"long").unwrap();
    symlink("/hello.txt", root.join("abs_link")).unwrap();
    symlink("data/nested", root.join("rel_link")).unwrap();
    symlink("bin/", root.join("dir_link")).unwrap();
    symlink("../../../../hello.txt", root.join("escape")).unwrap();
    symlink("nowhere", root.join("dangling")).unwrap();
    symlink("loop_b", root.join("loop_a")).unwrap();
    symlink("loop_a", root.join("loop_b")).unwrap();
    let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
}

/// Builds the sample tree into an image and opens it; the temp dir keeps both alive.
pub fn sample_image() -> (tempfile::TempDir, Arc<Image>) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    write_sample_tree(&tree);
    let path = dir.path().join("sample.img");
    build_image(&tree, &path).unwrap();
    let image = Image::open(&path).unwrap();
    (dir, Arc::new(image))
}
