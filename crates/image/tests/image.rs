//! Building images from a directory tree and reading them back, including corrupt images.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{BIG_LEN, big_contents, long_name, sample_image, write_sample_tree};
use forkvm_image::{Image, ImageError, Ino, Kind, PAGE_SIZE, Timespec, build_image};

fn lookup_path(image: &Image, path: &str) -> Ino {
    path.split('/').fold(image.root(), |dir, name| {
        image
            .lookup(dir, name.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{path} missing"))
    })
}

#[test]
fn build_reports_what_it_packed() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    write_sample_tree(&tree);
    let stats = build_image(&tree, &dir.path().join("out.img")).unwrap();
    // hello, big, tool, setuid, file.txt, hard1(=hard2), odd name, long name.
    assert_eq!(stats.files, 8);
    // root, bin, data, nested, deep, empty.
    assert_eq!(stats.dirs, 6);
    assert_eq!(stats.symlinks, 7);
    assert_eq!(stats.hard_links, 1);
    assert_eq!(stats.skipped, 1, "the fifo");
    assert_eq!(stats.aligned_files, 2, "big.bin and the ELF file");
    assert_eq!(stats.image_len % PAGE_SIZE, 0);
    let image = Image::open(dir.path().join("out.img")).unwrap();
    assert_eq!(image.digest(), stats.digest);
    assert_eq!(image.file_len(), stats.image_len);
    image.verify_digest().unwrap();
    let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        leftovers.len(),
        2,
        "only tree/ and out.img: no temp file left"
    );
}

#[test]
fn builds_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    write_sample_tree(&tree);
    build_image(&tree, &dir.path().join("a.img")).unwrap();
    build_image(&tree, &dir.path().join("b.img")).unwrap();
    assert_eq!(
        fs::read(dir.path().join("a.img")).unwrap(),
        fs::read(dir.path().join("b.img")).unwrap()
    );
}

#[test]
fn files_read_back_with_their_attributes() {
    let (_dir, image) = sample_image();
    let hello = lookup_path(&image, "hello.txt");
    let info = image.inode(hello).unwrap();
    assert_eq!(info.kind, Kind::File);
    assert_eq!(info.mode, 0o644);
    assert_eq!(info.size, 12);
    assert_eq!(info.nlink, 1);
    assert_eq!(
        info.mtime,
        Timespec {
            sec: 1_600_000_000,
            nsec: 123_456_789
        }
    );
    assert_eq!(image.file_bytes(hello).unwrap(), b"hello world\n");
    assert_eq!(
        image.inode(lookup_path(&image, "bin/setuid")).unwrap().mode,
        0o4755
    );
    let deep = lookup_path(&image, "data/nested/deep/file.txt");
    assert_eq!(image.file_bytes(deep).unwrap(), b"deep");
    let odd = lookup_path(&image, "sp ace & ünï");
    assert_eq!(image.file_bytes(odd).unwrap(), b"odd");
    let long = lookup_path(&image, &long_name());
    assert_eq!(image.file_bytes(long).unwrap(), b"long");
    assert_eq!(image.lookup(image.root(), b"fifo").unwrap(), None);
    assert_eq!(image.lookup(image.root(), b"missing").unwrap(), None);
}

#[test]
fn large_and_elf_files_are_page_aligned() {
    let (_dir, image) = sample_image();
    let big = lookup_path(&image, "big.bin");
    let offset = image
        .file_page_offset(big)
        .unwrap()
        .expect("big.bin aligned");
    assert_eq!(offset % PAGE_SIZE, 0);
    assert_eq!(image.file_bytes(big).unwrap(), big_contents());
    // The raw file at that offset holds the data, followed by zero padding to the page end.
    let raw = fs::read(image.path()).unwrap();
    let end = offset as usize + BIG_LEN;
    assert_eq!(&raw[offset as usize..end], big_contents());
    let page_end = end.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
    assert!(raw[end..page_end].iter().all(|&b| b == 0));
    let tool = lookup_path(&image, "bin/tool");
    assert!(image.file_page_offset(tool).unwrap().is_some());
    let hello = lookup_path(&image, "hello.txt");
    assert!(
        image.file_page_offset(hello).unwrap().is_none(),
        "small files are packed"
    );
}

#[test]
fn directories_list_sorted_entries_with_link_counts() {
    let (_dir, image) = sample_image();
    let names: Vec<Vec<u8>> = image
        .read_dir(image.root())
        .unwrap()
        .iter()
        .map(|entry| entry.name.to_vec())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.len(), 16, "the fifo is left out");
    let root = image.inode(image.root()).unwrap();
    assert_eq!(root.nlink, 2 + 3, "bin, data and empty, plus . and ..");
    let bin_entries = image.read_dir(lookup_path(&image, "bin")).unwrap();
    let kinds: Vec<_> = bin_entries.iter().map(|e| (e.name, e.kind)).collect();
    assert_eq!(
        kinds,
        [(&b"setuid"[..], Kind::File), (&b"tool"[..], Kind::File)]
    );
    let nested = lookup_path(&image, "data/nested");
    assert_eq!(image.parent(nested).unwrap(), lookup_path(&image, "data"));
    assert_eq!(image.parent(image.root()).unwrap(), image.root());
    assert!(matches!(
        image.read_dir(lookup_path(&image, "hello.txt")),
        Err(ImageError::WrongKind { .. })
    ));
}

#[test]
fn symlinks_and_hard_links_are_preserved() {
    let (_dir, image) = sample_image();
    let target = |name: &str| image.read_link(lookup_path(&image, name)).unwrap().to_vec();
    assert_eq!(target("abs_link"), b"/hello.txt");
    assert_eq!(target("rel_link"), b"data/nested");
    assert_eq!(target("dir_link"), b"bin/");
    assert_eq!(target("loop_a"), b"loop_b");
    let link = image.inode(lookup_path(&image, "abs_link")).unwrap();
    assert_eq!((link.kind, link.size), (Kind::Symlink, 10));
    let hard1 = lookup_path(&image, "hard1");
    assert_eq!(hard1, lookup_path(&image, "hard2"), "one inode, two names");
    assert_eq!(image.inode(hard1).unwrap().nlink, 2);
    assert_eq!(image.file_bytes(hard1).unwrap(), b"shared");
}

#[test]
fn non_images_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    assert!(matches!(
        Image::open(&empty),
        Err(ImageError::NotAnImage(_))
    ));
    let text = dir.path().join("text");
    fs::write(&text, vec![b'x'; 8192]).unwrap();
    assert!(matches!(Image::open(&text), Err(ImageError::NotAnImage(_))));
    assert!(matches!(
        Image::open(dir.path().join("absent")),
        Err(ImageError::Open { .. })
    ));
}

/// Reads everything reachable in `image`, ignoring errors: must never panic.
fn walk_everything(image: &Image) {
    for ino in 0..image.inode_count() {
        let ino = Ino(ino);
        let Ok(info) = image.inode(ino) else { continue };
        match info.kind {
            Kind::File => {
                let _ = image
                    .file_bytes(ino)
                    .map(|bytes| bytes.iter().map(|&b| b as u64).sum::<u64>());
                let _ = image.file_page_offset(ino);
            }
            Kind::Symlink => {
                let _ = image.read_link(ino);
            }
            Kind::Dir => {
                let _ = image.parent(ino);
                if let Ok(entries) = image.read_dir(ino) {
                    for entry in entries {
                        let _ = image.lookup(ino, entry.name);
                    }
                }
                let _ = image.lookup(ino, b"hello.txt");
                let _ = image.lookup(ino, b"zzz");
            }
            // The reader refuses these kinds, so no inode can have them.
            Kind::Fifo | Kind::Socket => panic!("an image inode of an overlay-only kind"),
        }
    }
}

#[test]
fn truncated_images_fail_to_open() {
    let (dir, image) = sample_image();
    let raw = fs::read(image.path()).unwrap();
    let cut = dir.path().join("cut.img");
    for len in [0, 10, 127, 128, 500, 4096, raw.len() - 4096, raw.len() - 1] {
        fs::write(&cut, &raw[..len]).unwrap();
        assert!(
            Image::open(&cut).is_err(),
            "truncated to {len} bytes opened"
        );
    }
}

#[test]
fn corrupted_images_give_errors_not_panics() {
    let (dir, image) = sample_image();
    let raw = fs::read(image.path()).unwrap();
    let metadata_end = 4096.min(raw.len());
    let bad_path = dir.path().join("bad.img");
    fs::write(&bad_path, &raw).unwrap();
    let bad = fs::File::options().write(true).open(&bad_path).unwrap();
    // Every byte of the header and tables (all of the metadata in this small image), set to
    // values that break offsets and lengths in different ways, one at a time.
    for at in 0..metadata_end {
        for value in [0xff, raw[at] ^ 0x01, raw[at] ^ 0x80] {
            bad.write_all_at(&[value], at as u64).unwrap();
            if let Ok(opened) = Image::open(&bad_path) {
                walk_everything(&opened);
            }
        }
        bad.write_all_at(&raw[at..=at], at as u64).unwrap();
    }
}

#[test]
fn the_digest_detects_changes_anywhere() {
    let (dir, image) = sample_image();
    image.verify_digest().unwrap();
    let raw = fs::read(image.path()).unwrap();
    let bad_path = dir.path().join("bad.img");
    // Spread over the header (digest field included), the tables and the file data.
    for at in (0..raw.len()).step_by(997).chain([90, 100, raw.len() - 1]) {
        let mut corrupt = raw.clone();
        corrupt[at] ^= 0x40;
        fs::write(&bad_path, &corrupt).unwrap();
        if let Ok(opened) = Image::open(&bad_path) {
            assert!(
                matches!(opened.verify_digest(), Err(ImageError::DigestMismatch)),
                "digest missed a change at byte {at}"
            );
        }
    }
}

#[test]
fn oversized_counts_and_offsets_are_rejected() {
    let (dir, image) = sample_image();
    let raw = fs::read(image.path()).unwrap();
    let bad = dir.path().join("bad.img");
    // Header fields: inode count, dirent count, then the six u64 offsets/lengths.
    let fields = [
        (12, 4),
        (16, 4),
        (24, 8),
        (32, 8),
        (40, 8),
        (48, 8),
        (56, 8),
        (64, 8),
    ];
    for (at, len) in fields {
        let mut corrupt = raw.clone();
        corrupt[at..at + len].fill(0xff);
        fs::write(&bad, &corrupt).unwrap();
        assert!(
            matches!(Image::open(&bad), Err(ImageError::CorruptHeader(_))),
            "field at {at}"
        );
    }
}
