//! Path resolution edge cases: `.`/`..` at the root, symlinks that try to escape, loops,
//! non-directories in the middle, trailing slashes and length limits.

mod common;

use common::{long_name, sample_image};
use forkvm_image::{Fs, FsError, Kind, MAX_SYMLINKS, PATH_MAX};

fn fs() -> (tempfile::TempDir, Fs) {
    let (dir, image) = sample_image();
    (dir, Fs::new(image))
}

/// Resolves `path` from `/` following the last symlink; returns the canonical path.
fn canonical(fs: &Fs, path: &str) -> Result<String, FsError> {
    fs.resolve(b"/", path.as_bytes(), true)
        .map(|resolved| String::from_utf8(resolved.path).unwrap())
}

#[test]
fn dot_and_dot_dot_never_leave_the_root() {
    let (_dir, fs) = fs();
    for path in [
        "/",
        "/..",
        "/../..",
        ".",
        "..",
        "/./.",
        "//",
        "../../bin/..",
    ] {
        let resolved = fs.resolve(b"/", path.as_bytes(), true).unwrap();
        assert_eq!(resolved.node, fs.root(), "{path}");
        assert_eq!(resolved.path, b"/");
    }
    assert_eq!(
        canonical(&fs, "/data/nested/../nested/./deep//").unwrap(),
        "/data/nested/deep"
    );
    assert_eq!(
        canonical(&fs, "bin/../../../hello.txt").unwrap(),
        "/hello.txt"
    );
}

#[test]
fn relative_paths_start_at_cwd() {
    let (_dir, fs) = fs();
    let resolved = fs.resolve(b"/data/nested", b"deep/file.txt", true).unwrap();
    assert_eq!(resolved.path, b"/data/nested/deep/file.txt");
    assert_eq!(fs.kind(resolved.node).unwrap(), Kind::File);
    assert_eq!(
        fs.resolve(b"/data/nested", b"..", true).unwrap().path,
        b"/data"
    );
    assert_eq!(fs.resolve(b"/data", b"/bin", true).unwrap().path, b"/bin");
}

#[test]
fn symlinks_resolve_inside_the_tree() {
    let (_dir, fs) = fs();
    assert_eq!(canonical(&fs, "abs_link").unwrap(), "/hello.txt");
    assert_eq!(
        canonical(&fs, "rel_link/deep/file.txt").unwrap(),
        "/data/nested/deep/file.txt"
    );
    assert_eq!(canonical(&fs, "dir_link/tool").unwrap(), "/bin/tool");
    // `..` after a followed symlink is relative to its target, not to the link's directory.
    assert_eq!(canonical(&fs, "rel_link/..").unwrap(), "/data");
    // `../../../../hello.txt` from the root stays at the root.
    assert_eq!(canonical(&fs, "escape").unwrap(), "/hello.txt");
    assert_eq!(
        canonical(&fs, "/data/nested/deep/../../../escape").unwrap(),
        "/hello.txt"
    );
    // Not following the last component gives the link itself.
    let link = fs.resolve(b"/", b"abs_link", false).unwrap();
    assert_eq!(link.path, b"/abs_link");
    assert_eq!(fs.kind(link.node).unwrap(), Kind::Symlink);
    assert!(matches!(canonical(&fs, "dangling"), Err(FsError::NotFound)));
    assert!(fs.resolve(b"/", b"dangling", false).is_ok());
}

#[test]
fn symlink_loops_and_long_chains_are_refused() {
    let (_dir, mut fs) = fs();
    assert!(matches!(canonical(&fs, "loop_a"), Err(FsError::Loop)));
    assert!(matches!(canonical(&fs, "loop_a/x"), Err(FsError::Loop)));
    assert!(fs.resolve(b"/", b"loop_a", false).is_ok());
    // A chain of exactly MAX_SYMLINKS links resolves; one more is a loop.
    let root = fs.root();
    fs.symlink(root, b"chain0", b"/hello.txt").unwrap();
    for i in 1..=MAX_SYMLINKS {
        let target = format!("chain{}", i - 1);
        fs.symlink(root, format!("chain{i}").as_bytes(), target.as_bytes())
            .unwrap();
    }
    let last_ok = format!("chain{}", MAX_SYMLINKS - 1);
    assert_eq!(canonical(&fs, &last_ok).unwrap(), "/hello.txt");
    let one_too_many = format!("chain{MAX_SYMLINKS}");
    assert!(matches!(canonical(&fs, &one_too_many), Err(FsError::Loop)));
}

#[test]
fn non_directories_in_the_middle_and_trailing_slashes() {
    let (_dir, fs) = fs();
    for path in [
        "hello.txt/x",
        "hello.txt/",
        "hello.txt/.",
        "hello.txt/..",
        "abs_link/",
    ] {
        assert!(
            matches!(canonical(&fs, path), Err(FsError::NotDir)),
            "{path}"
        );
    }
    assert!(matches!(
        fs.resolve(b"/", b"abs_link/", false),
        Err(FsError::NotDir)
    ));
    // A trailing slash follows a symlink to a directory even without follow_last.
    let bin = fs.resolve(b"/", b"dir_link/", false).unwrap();
    assert_eq!(bin.path, b"/bin");
    assert_eq!(canonical(&fs, "bin/").unwrap(), "/bin");
    assert!(matches!(
        canonical(&fs, "missing/x"),
        Err(FsError::NotFound)
    ));
}

#[test]
fn length_limits() {
    let (_dir, fs) = fs();
    assert!(matches!(canonical(&fs, ""), Err(FsError::NotFound)));
    assert!(canonical(&fs, &long_name()).is_ok());
    let too_long_name = "n".repeat(256);
    assert!(matches!(
        canonical(&fs, &too_long_name),
        Err(FsError::NameTooLong)
    ));
    let longest_path = format!("/{}", "./".repeat((PATH_MAX - 2) / 2));
    assert_eq!(longest_path.len(), PATH_MAX - 1);
    assert!(canonical(&fs, &longest_path).is_ok());
    let too_long_path = format!("{longest_path}.");
    assert!(matches!(
        canonical(&fs, &too_long_path),
        Err(FsError::NameTooLong)
    ));
}

#[test]
fn parents_of_paths_for_create_and_remove() {
    let (_dir, fs) = fs();
    let parent = fs.resolve_parent(b"/", b"/data/nested/new.txt").unwrap();
    assert_eq!(parent.dir.path, b"/data/nested");
    assert_eq!(parent.name, b"new.txt");
    assert!(!parent.trailing_slash);
    assert_eq!(parent.child_path(), b"/data/nested/new.txt");
    let parent = fs.resolve_parent(b"/bin", b"newdir//").unwrap();
    assert_eq!(
        (parent.dir.path.as_slice(), parent.name.as_slice()),
        (&b"/bin"[..], &b"newdir"[..])
    );
    assert!(parent.trailing_slash);
    let parent = fs.resolve_parent(b"/bin", b"/top").unwrap();
    assert_eq!(parent.dir.path, b"/");
    assert_eq!(parent.child_path(), b"/top");
    // The parent is followed through symlinks; the final name is not.
    let parent = fs.resolve_parent(b"/", b"rel_link/abs_link").unwrap();
    assert_eq!(parent.dir.path, b"/data/nested");
    for path in ["/", "//", ".", "a/..", "bin/."] {
        assert!(
            matches!(
                fs.resolve_parent(b"/", path.as_bytes()),
                Err(FsError::Invalid)
            ),
            "{path}"
        );
    }
    assert!(matches!(
        fs.resolve_parent(b"/", b"hello.txt/x"),
        Err(FsError::NotDir)
    ));
    assert!(matches!(
        fs.resolve_parent(b"/", b"missing/x"),
        Err(FsError::NotFound)
    ));
}

#[test]
fn removed_directories_fail_relative_resolution() {
    let (_dir, mut fs) = fs();
    let root = fs.root();
    let gone = fs.mkdir(root, b"gone", 0o755).unwrap();
    fs.open_ref(gone);
    fs.rmdir(root, b"gone").unwrap();
    assert!(matches!(
        fs.resolve(b"/gone", b"x", true),
        Err(FsError::NotFound)
    ));
    assert!(matches!(fs.canonical_path(gone), Err(FsError::NotFound)));
    assert!(matches!(
        fs.create_file(gone, b"x", 0o644),
        Err(FsError::NotFound)
    ));
    fs.close_ref(gone);
}
