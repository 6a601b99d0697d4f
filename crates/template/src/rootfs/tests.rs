use std::os::unix::fs::{PermissionsExt, symlink};

use super::*;

fn spec(suite: &str, packages: &[&str]) -> RootfsSpec {
    RootfsSpec {
        suite: suite.to_owned(),
        packages: packages.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn cache_key_ignores_package_order_and_duplicates() {
    let a = spec("bookworm", &["python3", "python3-numpy"]);
    let b = spec("bookworm", &["python3-numpy", "python3", "python3"]);
    assert_eq!(a.cache_key(), b.cache_key());
    assert_eq!(a.cache_key().len(), 64);
    assert!(a.cache_key().chars().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn cache_key_changes_with_every_input() {
    let base = spec("bookworm", &["python3", "python3-numpy"]);
    let others = [
        spec("trixie", &["python3", "python3-numpy"]),
        spec("bookworm", &["python3"]),
        spec("bookworm", &["python3", "python3-numpy", "python3-scipy"]),
        // Same bytes split differently must not collide.
        spec("bookworm", &["python3python3-numpy"]),
        spec("bookwormpython3", &["python3-numpy"]),
    ];
    for other in &others {
        assert_ne!(base.cache_key(), other.cache_key(), "{other:?}");
    }
    assert_eq!(
        RootfsSpec::default().cache_key(),
        RootfsSpec::default().cache_key()
    );
}

#[test]
fn image_path_uses_the_key_prefix() {
    let spec = RootfsSpec::default();
    let path = spec.image_path(Path::new("/cache"));
    assert_eq!(
        path,
        Path::new(&format!("/cache/rootfs-{}.img", &spec.cache_key()[..16]))
    );
}

#[test]
fn cache_dir_comes_from_the_environment_or_the_system_default() {
    assert_eq!(cache_dir_from(None), Path::new(SYSTEM_CACHE_DIR));
    assert_eq!(cache_dir_from(Some("".into())), Path::new(SYSTEM_CACHE_DIR));
    assert_eq!(cache_dir_from(Some("/x/y".into())), Path::new("/x/y"));
}

#[test]
fn names_that_could_inject_options_are_refused() {
    assert!(RootfsSpec::default().validate().is_ok());
    for (suite, package) in [
        ("bookworm", "--root=/"),
        ("bookworm", "python3,evil"),
        ("bookworm", "Python3"),
        ("bookworm", "a"),
        ("bookworm", ""),
        ("-bookworm", "python3"),
        ("book worm", "python3"),
        ("", "python3"),
    ] {
        assert!(
            matches!(
                spec(suite, &[package]).validate(),
                Err(RootfsError::InvalidName { .. })
            ),
            "{suite:?} {package:?}"
        );
    }
    assert!(
        spec("bookworm", &["libstdc++6", "g++-12", "python3.11"])
            .validate()
            .is_ok()
    );
}

#[test]
fn preparing_a_tree_trims_and_adds_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in [
        "usr/share/doc/pkg",
        "usr/share/locale/de",
        "etc",
        "usr/lib",
        "var/log",
    ] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::write(root.join("usr/share/doc/pkg/copyright"), b"text").unwrap();
    fs::write(root.join("usr/share/locale/locale.alias"), b"alias").unwrap();
    fs::write(root.join("var/log/dpkg.log"), b"log").unwrap();
    fs::write(root.join("usr/lib/os-release"), b"ID=debian\n").unwrap();
    symlink("../usr/lib/os-release", root.join("etc/os-release")).unwrap();
    prepare_tree(root).unwrap();
    for trimmed in ["usr/share/doc", "usr/share/locale", "var/log"] {
        assert_eq!(
            fs::read_dir(root.join(trimmed)).unwrap().count(),
            0,
            "{trimmed}"
        );
    }
    let tmp = fs::metadata(root.join("tmp")).unwrap();
    assert!(tmp.is_dir());
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
    assert!(root.join("usr/lib/os-release").exists());

    fs::remove_file(root.join("etc/os-release")).unwrap();
    assert!(matches!(
        prepare_tree(root),
        Err(RootfsError::MissingFile("/etc/os-release"))
    ));
}

#[test]
fn mount_points_are_detected() {
    assert!(has_mounts_under(Path::new("/")));
    let dir = tempfile::tempdir().unwrap();
    assert!(!has_mounts_under(dir.path()));
    assert!(
        has_mounts_under(&dir.path().join("missing")),
        "unknown counts as mounted"
    );
    assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
    assert_eq!(unescape_mount_path(r"/plain\0"), r"/plain\0");
}

#[test]
fn scratch_trees_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch");
    fs::create_dir_all(path.join("a/b")).unwrap();
    let tree = ScratchTree { path: path.clone() };
    tree.clear().unwrap();
    assert!(!path.exists());
    fs::create_dir_all(&path).unwrap();
    drop(tree);
    assert!(!path.exists());
}

/// Builds the real default image with mmdebstrap (root, apt sources reachable, ~1 minute,
/// ~350 MB of scratch space) into the default cache directory, then checks it.
#[test]
#[ignore = "runs mmdebstrap: needs root and the apt sources"]
fn builds_the_default_rootfs() {
    let cache_dir = default_cache_dir();
    let path = ensure_rootfs(&RootfsSpec::default(), &cache_dir, &mut |step| {
        eprintln!("{step}")
    })
    .unwrap();
    let image = Image::open(&path).unwrap();
    image.verify_digest().unwrap();
    let mut dir = image.root();
    for name in [
        "usr",
        "lib",
        "python3",
        "dist-packages",
        "numpy",
        "__init__.py",
    ] {
        dir = image
            .lookup(dir, name.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{name}"));
    }
    let again = ensure_rootfs(&RootfsSpec::default(), &cache_dir, &mut |step| {
        panic!("cached image rebuilt: {step}")
    })
    .unwrap();
    assert_eq!(again, path);
}
