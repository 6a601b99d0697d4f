//! The writable overlay over an image: copy-up, whiteouts, merged listings, renames, clones,
//! open-after-unlink and the byte cap.

mod common;

use std::sync::Arc;

use common::{BIG_LEN, big_contents, sample_image};
use forkvm_image::{Fs, FsError, Kind, NodeId, S_IFDIR, S_IFMT, S_IFREG, Timespec};

fn node(fs: &Fs, path: &str) -> NodeId {
    fs.resolve(b"/", path.as_bytes(), false).unwrap().node
}

fn exists(fs: &Fs, path: &str) -> bool {
    match fs.resolve(b"/", path.as_bytes(), false) {
        Ok(_) => true,
        Err(FsError::NotFound) => false,
        Err(error) => panic!("resolving {path}: {error}"),
    }
}

fn read_all(fs: &Fs, id: NodeId) -> Vec<u8> {
    let mut buf = vec![0; fs.stat(id).unwrap().size as usize + 10];
    let n = fs.read_at(id, 0, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn names(fs: &Fs, dir: &str) -> Vec<String> {
    fs.read_dir(node(fs, dir))
        .unwrap()
        .into_iter()
        .map(|entry| String::from_utf8(entry.name).unwrap())
        .collect()
}

#[test]
fn new_files_can_be_written_and_read() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let tmp = fs.mkdir(fs.root(), b"tmp", 0o1777).unwrap();
    let file = fs.create_file(tmp, b"a.txt", 0o600).unwrap();
    assert_eq!(fs.write_at(file, 0, b"hello").unwrap(), 5);
    assert_eq!(fs.write_at(file, 8, b"!").unwrap(), 1);
    assert_eq!(read_all(&fs, file), b"hello\0\0\0!");
    let mut buf = [0u8; 4];
    assert_eq!(fs.read_at(file, 7, &mut buf).unwrap(), 2);
    assert_eq!(fs.read_at(file, 100, &mut buf).unwrap(), 0);
    let stat = fs.stat(file).unwrap();
    assert_eq!((stat.mode & S_IFMT, stat.mode & 0o7777), (S_IFREG, 0o600));
    assert_eq!((stat.size, stat.nlink, stat.blocks), (9, 1, 8));
    assert_eq!(fs.stat(tmp).unwrap().mode, S_IFDIR | 0o1777);
    assert_eq!(node(&fs, "tmp/a.txt"), file);
    assert!(matches!(
        fs.create_file(tmp, b"a.txt", 0o600),
        Err(FsError::Exists)
    ));
    assert!(matches!(fs.write_at(tmp, 0, b"x"), Err(FsError::IsDir)));
    let link = node(&fs, "abs_link");
    assert!(matches!(fs.write_at(link, 0, b"x"), Err(FsError::Invalid)));
}

#[test]
fn writes_copy_image_files_up_and_leave_the_image_untouched() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(Arc::clone(&image));
    let big = node(&fs, "big.bin");
    let NodeId::Image(ino) = big else {
        panic!("image node expected")
    };
    let (offset, len) = fs
        .image_backing(big)
        .unwrap()
        .expect("mappable before a write");
    assert_eq!(len, BIG_LEN as u64);
    assert_eq!(Some(offset), image.file_page_offset(ino).unwrap());
    fs.write_at(big, 1, b"XY").unwrap();
    assert_eq!(fs.image_backing(big).unwrap(), None);
    let mut expected = big_contents();
    expected[1..3].copy_from_slice(b"XY");
    assert_eq!(read_all(&fs, big), expected);
    assert_eq!(image.file_bytes(ino).unwrap(), big_contents());
    assert!(fs.used_bytes() >= BIG_LEN as u64);

    let hello = node(&fs, "hello.txt");
    fs.truncate(hello, 5).unwrap();
    assert_eq!(read_all(&fs, hello), b"hello");
    fs.truncate(hello, 7).unwrap();
    assert_eq!(read_all(&fs, hello), b"hello\0\0");
    assert!(fs.stat(hello).unwrap().mtime.sec > 1_600_000_000);
    // The hard link names the same node, so it sees the change too.
    let hard1 = node(&fs, "hard1");
    fs.write_at(hard1, 0, b"S").unwrap();
    assert_eq!(read_all(&fs, node(&fs, "hard2")), b"Shared");
}

#[test]
fn unlink_leaves_a_whiteout_and_the_name_can_be_reused() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let root = fs.root();
    fs.unlink(root, b"hello.txt").unwrap();
    assert!(!exists(&fs, "hello.txt"));
    assert!(!names(&fs, "/").contains(&"hello.txt".to_string()));
    assert!(matches!(
        fs.unlink(root, b"hello.txt"),
        Err(FsError::NotFound)
    ));
    assert!(matches!(
        fs.resolve(b"/", b"abs_link", true),
        Err(FsError::NotFound)
    ));
    let new = fs.create_file(root, b"hello.txt", 0o644).unwrap();
    assert_eq!(fs.stat(new).unwrap().size, 0);
    assert!(matches!(fs.unlink(root, b"bin"), Err(FsError::IsDir)));
    // Unlinking one of two hard links keeps the other.
    fs.unlink(root, b"hard1").unwrap();
    let hard2 = node(&fs, "hard2");
    assert_eq!(fs.stat(hard2).unwrap().nlink, 1);
    assert_eq!(read_all(&fs, hard2), b"shared");
}

#[test]
fn directory_listings_merge_image_and_overlay() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let bin = node(&fs, "bin");
    fs.create_file(bin, b"python3", 0o755).unwrap();
    fs.create_file(bin, b"a-first", 0o755).unwrap();
    fs.unlink(bin, b"setuid").unwrap();
    fs.symlink(bin, b"sh", b"/bin/tool").unwrap();
    assert_eq!(names(&fs, "bin"), ["a-first", "python3", "sh", "tool"]);
    let kinds: Vec<Kind> = fs.read_dir(bin).unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [Kind::File, Kind::File, Kind::Symlink, Kind::File]);
    assert_eq!(fs.read_link(node(&fs, "bin/sh")).unwrap(), b"/bin/tool");
    assert!(matches!(
        fs.read_dir(node(&fs, "hello.txt")),
        Err(FsError::NotDir)
    ));
}

#[test]
fn mkdir_and_rmdir_keep_link_counts() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let root = fs.root();
    let nlink = |fs: &Fs, id| fs.stat(id).unwrap().nlink;
    let before = nlink(&fs, root);
    let made = fs.mkdir(root, b"made", 0o755).unwrap();
    assert_eq!(nlink(&fs, root), before + 1);
    assert_eq!(nlink(&fs, made), 2);
    assert_eq!(fs.parent(made).unwrap(), root);
    fs.create_file(made, b"f", 0o644).unwrap();
    assert!(matches!(fs.rmdir(root, b"made"), Err(FsError::NotEmpty)));
    assert!(matches!(fs.rmdir(root, b"hello.txt"), Err(FsError::NotDir)));
    fs.unlink(made, b"f").unwrap();
    fs.rmdir(root, b"made").unwrap();
    assert_eq!(nlink(&fs, root), before);
    // An image directory: empty it, then remove it.
    let data = node(&fs, "data");
    assert!(matches!(fs.rmdir(root, b"data"), Err(FsError::NotEmpty)));
    let deep = node(&fs, "data/nested/deep");
    fs.unlink(deep, b"file.txt").unwrap();
    fs.rmdir(node(&fs, "data/nested"), b"deep").unwrap();
    fs.rmdir(data, b"nested").unwrap();
    fs.rmdir(root, b"data").unwrap();
    assert!(!exists(&fs, "data"));
    assert!(matches!(
        fs.mkdir(data, b"x", 0o755),
        Err(FsError::NotFound)
    ));
    fs.mkdir(root, b"data", 0o700).unwrap();
    assert!(
        names(&fs, "data").is_empty(),
        "a new directory hides nothing old"
    );
}

#[test]
fn rename_moves_files_and_directories() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let root = fs.root();
    let bin = node(&fs, "bin");
    let hello = node(&fs, "hello.txt");
    // Image file within a directory, then across directories.
    fs.rename(root, b"hello.txt", root, b"greeting").unwrap();
    assert!(!exists(&fs, "hello.txt"));
    assert_eq!(node(&fs, "greeting"), hello);
    fs.rename(root, b"greeting", bin, b"greeting").unwrap();
    assert_eq!(node(&fs, "bin/greeting"), hello);
    assert_eq!(read_all(&fs, hello), b"hello world\n");
    // File over file: the replaced file is gone.
    fs.rename(bin, b"greeting", bin, b"tool").unwrap();
    assert_eq!(names(&fs, "bin"), ["setuid", "tool"]);
    assert_eq!(read_all(&fs, node(&fs, "bin/tool")), b"hello world\n");
    // Renaming onto another name of the same node does nothing.
    fs.rename(root, b"hard1", root, b"hard2").unwrap();
    assert!(exists(&fs, "hard1") && exists(&fs, "hard2"));
    // Directory across parents, keeping its contents; parents' link counts follow.
    let root_links = fs.stat(root).unwrap().nlink;
    let data = node(&fs, "data");
    fs.rename(root, b"data", bin, b"data").unwrap();
    assert_eq!(
        read_all(&fs, node(&fs, "bin/data/nested/deep/file.txt")),
        b"deep"
    );
    assert_eq!(fs.stat(root).unwrap().nlink, root_links - 1);
    assert_eq!(fs.stat(bin).unwrap().nlink, 3);
    assert_eq!(fs.parent(data).unwrap(), bin);
    assert_eq!(
        fs.canonical_path(node(&fs, "bin/data/nested")).unwrap(),
        b"/bin/data/nested"
    );
    // Directory over an empty directory, and the errors.
    fs.rename(bin, b"data", root, b"empty").unwrap();
    assert_eq!(names(&fs, "empty"), ["nested"]);
    let empty = node(&fs, "empty");
    let nested = node(&fs, "empty/nested");
    assert!(matches!(
        fs.rename(root, b"empty", nested, b"x"),
        Err(FsError::Invalid)
    ));
    assert!(matches!(fs.rename(root, b"empty", root, b"empty2"), Ok(())));
    assert!(matches!(
        fs.rename(root, b"bin", root, b"empty2"),
        Err(FsError::NotEmpty)
    ));
    assert!(matches!(
        fs.rename(root, b"hard1", root, b"bin"),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        fs.rename(root, b"bin", root, b"hard1"),
        Err(FsError::NotDir)
    ));
    assert!(matches!(
        fs.rename(root, b"nope", root, b"x"),
        Err(FsError::NotFound)
    ));
    assert_eq!(fs.canonical_path(empty).unwrap(), b"/empty2");
}

#[test]
fn unlinked_open_files_stay_usable_until_closed() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::with_limit(image, 1 << 20);
    let root = fs.root();
    let file = fs.create_file(root, b"scratch", 0o600).unwrap();
    fs.write_at(file, 0, &[7; 1000]).unwrap();
    fs.open_ref(file);
    let used_before = fs.used_bytes();
    fs.unlink(root, b"scratch").unwrap();
    assert!(!exists(&fs, "scratch"));
    assert_eq!(fs.stat(file).unwrap().nlink, 0);
    fs.write_at(file, 1000, b"more").unwrap();
    assert_eq!(read_all(&fs, file).len(), 1004);
    fs.close_ref(file);
    assert!(
        fs.used_bytes() < used_before - 1000,
        "data freed on last close"
    );
    assert!(matches!(fs.stat(file), Err(FsError::NotFound)));
    // The same for an image file that was written through its handle.
    let hello = node(&fs, "hello.txt");
    fs.open_ref(hello);
    fs.unlink(root, b"hello.txt").unwrap();
    fs.write_at(hello, 0, b"J").unwrap();
    assert_eq!(read_all(&fs, hello), b"Jello world\n");
    fs.close_ref(hello);
}

#[test]
fn clones_are_independent() {
    let (_dir, image) = sample_image();
    let mut original = Fs::new(image);
    let root = original.root();
    let shared = original.create_file(root, b"shared", 0o644).unwrap();
    original.write_at(shared, 0, b"before").unwrap();
    let mut fork = original.clone();
    fork.write_at(shared, 0, b"FORK").unwrap();
    fork.unlink(root, b"hello.txt").unwrap();
    fork.create_file(root, b"only-in-fork", 0o644).unwrap();
    original
        .write_at(node(&original, "big.bin"), 0, b"O")
        .unwrap();
    assert_eq!(read_all(&original, shared), b"before");
    assert_eq!(read_all(&fork, shared), b"FORKre");
    assert!(exists(&original, "hello.txt") && !exists(&fork, "hello.txt"));
    assert!(!exists(&original, "only-in-fork") && exists(&fork, "only-in-fork"));
    assert_eq!(read_all(&fork, node(&fork, "big.bin"))[0], 0);
    assert_eq!(read_all(&original, node(&original, "big.bin"))[0], b'O');
}

#[test]
fn the_byte_cap_gives_no_space() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::with_limit(image, 64 * 1024);
    let root = fs.root();
    let file = fs.create_file(root, b"fill", 0o644).unwrap();
    fs.write_at(file, 0, &vec![1; 60 * 1024]).unwrap();
    assert!(matches!(
        fs.write_at(file, 60 * 1024, &[1; 8 * 1024]),
        Err(FsError::NoSpace)
    ));
    assert!(matches!(fs.truncate(file, 1 << 30), Err(FsError::NoSpace)));
    // Copying big.bin up would exceed the cap too; nothing changes.
    let big = node(&fs, "big.bin");
    assert!(matches!(fs.write_at(big, 0, b"x"), Err(FsError::NoSpace)));
    assert!(fs.image_backing(big).unwrap().is_some());
    assert!(fs.used_bytes() <= fs.limit());
    fs.unlink(root, b"fill").unwrap();
    fs.write_at(big, 0, b"x").unwrap();
    assert!(matches!(
        fs.write_at(big, u64::MAX - 1, b"xy"),
        Err(FsError::FileTooBig)
    ));
}

#[test]
fn undoing_changes_returns_their_bytes() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::with_limit(image, 1 << 20);
    let root = fs.root();
    let bin = node(&fs, "bin");
    // Touch both directories once so their metadata records are part of the baseline.
    fs.set_mode(root, 0o755).unwrap();
    fs.set_mode(bin, 0o755).unwrap();
    let baseline = fs.used_bytes();
    let file = fs.create_file(root, b"tmpfile", 0o600).unwrap();
    fs.write_at(file, 0, &[1; 5000]).unwrap();
    fs.rename(root, b"tmpfile", bin, b"moved").unwrap();
    fs.unlink(bin, b"moved").unwrap();
    let dir = fs.mkdir(root, b"d", 0o755).unwrap();
    fs.symlink(dir, b"l", b"/somewhere").unwrap();
    fs.unlink(dir, b"l").unwrap();
    fs.rmdir(root, b"d").unwrap();
    // Renaming an image file away and back leaves its metadata record (128 bytes) and the
    // root entry that now names it (64 bytes plus the name) behind.
    fs.rename(root, b"hello.txt", bin, b"h").unwrap();
    fs.rename(bin, b"h", root, b"hello.txt").unwrap();
    assert_eq!(
        fs.used_bytes(),
        baseline + 128 + 64 + b"hello.txt".len() as u64
    );
}

#[test]
fn metadata_changes_show_in_stat() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let tool = node(&fs, "bin/tool");
    fs.set_mode(tool, S_IFREG | 0o4700).unwrap();
    fs.set_owner(tool, Some(1000), None).unwrap();
    let time = Timespec { sec: 42, nsec: 7 };
    fs.set_times(tool, Some(time), None).unwrap();
    let stat = fs.stat(tool).unwrap();
    assert_eq!(stat.mode, S_IFREG | 0o4700);
    assert_eq!((stat.uid, stat.gid), (1000, 0));
    assert_eq!(stat.atime, time);
    assert!(
        fs.image_backing(tool).unwrap().is_some(),
        "metadata changes copy no data"
    );
    fs.set_default_owner(1000, 1000);
    let mine = fs.create_file(fs.root(), b"mine", 0o644).unwrap();
    assert_eq!(
        (fs.stat(mine).unwrap().uid, fs.stat(mine).unwrap().gid),
        (1000, 1000)
    );
}

#[test]
fn file_systems_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Fs>();
}

#[test]
fn removed_directories_stay_empty_through_old_handles() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let deep = node(&fs, "data/nested/deep");
    fs.unlink(deep, b"file.txt").unwrap();
    fs.rmdir(node(&fs, "data/nested"), b"deep").unwrap();
    assert_eq!(fs.lookup(deep, b"file.txt").unwrap(), None);
    assert!(fs.read_dir(deep).unwrap().is_empty());
    assert_eq!(fs.stat(deep).unwrap().nlink, 0);
}

#[test]
fn hard_links_in_the_overlay_share_data() {
    let (_dir, image) = sample_image();
    let mut fs = Fs::new(image);
    let root = fs.root();
    let hello = node(&fs, "hello.txt");
    fs.link(hello, node(&fs, "bin"), b"hello-again").unwrap();
    assert_eq!(fs.stat(hello).unwrap().nlink, 2);
    fs.write_at(node(&fs, "bin/hello-again"), 0, b"Y").unwrap();
    assert_eq!(read_all(&fs, hello), b"Yello world\n");
    assert!(matches!(
        fs.link(node(&fs, "bin"), root, b"x"),
        Err(FsError::NotPermitted)
    ));
    assert!(matches!(
        fs.link(hello, root, b"hard1"),
        Err(FsError::Exists)
    ));
}
