//! Loading a snapshot checks integrity, image and CPU compatibility before anything runs.

use std::path::{Path, PathBuf};

use forkvm_template::{SnapshotError, SnapshotMeta, StoreError, TemplateStore, snapshot};
use forkvm_vmm::Vmm;

/// A private copy of the built `python` template, named `name`, in its own store.
fn copy_template(name: &str) -> Option<(TemplateStore, PathBuf)> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let built = forkvm_testkit::python_template(&base.join("snapshot-templates"));
    let root = base.join(format!("snapshot-copies-{name}"));
    let _ = std::fs::remove_dir_all(&root);
    let store = TemplateStore::new(&root);
    let dir = store.dir("python").unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    // memory, state.bin, meta.json, and a file per shared segment (or other process).
    for entry in std::fs::read_dir(built.dir("python").unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "verified") {
            copy_sparse(&path, &dir.join(path.file_name().unwrap()));
        }
    }
    // The copy is sealed with the original cache's key.
    let key = built.sealer().unwrap().key_path().to_owned();
    std::fs::copy(key, root.join("seal.key")).unwrap();
    Some((store, dir))
}

/// Copies a file keeping its holes: a memory file is mostly holes, and `std::fs::copy` would
/// write every zero (a gigabyte per copy, enough to fill a CI disk across these tests).
fn copy_sparse(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

fn load_error(store: &TemplateStore) -> StoreError {
    match store.load("python", &Vmm::new().unwrap()) {
        Ok(_) => panic!("a damaged snapshot loaded"),
        Err(e) => e,
    }
}

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, offset).unwrap();
}

/// Edits `meta.json` and seals it again, as a build on this machine would have written it.
fn edit_meta(store: &TemplateStore, dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut meta);
    let mut meta: SnapshotMeta = serde_json::from_value(meta).unwrap();
    snapshot::write_meta(dir, &mut meta, &store.sealer().unwrap()).unwrap();
}

fn corrupt_path(error: &StoreError) -> &Path {
    match error {
        StoreError::Snapshot(SnapshotError::Corrupt { path }) => path,
        other => panic!("expected a corrupt file, got {other}"),
    }
}

#[test]
fn an_intact_copy_loads() {
    let Some((store, _)) = copy_template("intact") else {
        return;
    };
    store.load("python", &Vmm::new().unwrap()).unwrap();
}

#[test]
fn a_changed_memory_byte_is_caught() {
    let Some((store, dir)) = copy_template("memory") else {
        return;
    };
    let meta = store.show("python").unwrap();
    let (offset, _) = meta.memory_extents[meta.memory_extents.len() / 2];
    // Verified once (and stamped), then changed: the change is still caught.
    store.load("python", &Vmm::new().unwrap()).unwrap();
    flip_byte(&dir.join("memory"), offset + 100);
    let error = load_error(&store);
    assert_eq!(corrupt_path(&error), dir.join("memory"));
    assert!(error.to_string().contains("memory"), "{error}");
}

#[test]
fn a_changed_segment_byte_is_caught() {
    let Some((store, dir)) = copy_template("segment") else {
        return;
    };
    // The agent maps glibc's gconv cache shared: the snapshot keeps it as a segment.
    let meta = store.show("python").unwrap();
    let segment = meta
        .segments
        .first()
        .expect("the python template has a segment");
    let (offset, _) = segment.extents[0];
    let path = dir.join(format!("segment-{}", segment.id));
    flip_byte(&path, offset + 10);
    assert_eq!(corrupt_path(&load_error(&store)), path);
}

#[test]
fn data_written_into_a_hole_is_caught() {
    let Some((store, dir)) = copy_template("hole") else {
        return;
    };
    let meta = store.show("python").unwrap();
    // The first page after the first extent is a hole unless the next extent starts there.
    let (start, len) = meta.memory_extents[0];
    let hole = start + len;
    assert!(meta.memory_extents.iter().all(|&(s, _)| s != hole));
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory"))
            .unwrap();
        file.write_all_at(b"marker", hole + 64).unwrap();
    }
    let error = load_error(&store);
    assert!(
        matches!(
            &error,
            StoreError::Snapshot(SnapshotError::DataInHole { offset, .. }) if *offset == hole + 64
        ),
        "{error}"
    );
}

#[test]
fn metadata_changed_without_the_key_is_refused() {
    let Some((store, dir)) = copy_template("unsealed") else {
        return;
    };
    let path = dir.join("meta.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    meta["ram_bytes"] = serde_json::json!(meta["ram_bytes"].as_u64().unwrap() * 2);
    std::fs::write(&path, serde_json::to_string(&meta).unwrap()).unwrap();
    let error = load_error(&store);
    assert!(
        matches!(error, StoreError::Snapshot(SnapshotError::Unsealed { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("meta.json"), "{error}");
}

#[test]
fn a_changed_image_byte_is_caught() {
    let Some((store, dir)) = copy_template("image-body") else {
        return;
    };
    // A private copy of the image, one byte of its body changed.
    let original = store.show("python").unwrap().image_path;
    let copy = dir.join("image.img");
    copy_sparse(&original, &copy);
    let len = std::fs::metadata(&copy).unwrap().len();
    flip_byte(&copy, len / 2);
    let copy_str = copy.to_str().unwrap().to_owned();
    edit_meta(&store, &dir, |meta| {
        meta["image_path"] = serde_json::json!(copy_str)
    });
    let error = load_error(&store);
    assert!(
        matches!(&error, StoreError::Snapshot(SnapshotError::ImageCorrupt { path }) if *path == copy),
        "{error}"
    );
}

#[test]
fn a_changed_state_byte_is_caught() {
    let Some((store, dir)) = copy_template("state") else {
        return;
    };
    flip_byte(&dir.join("state.bin"), 200);
    assert_eq!(corrupt_path(&load_error(&store)), dir.join("state.bin"));
}

#[test]
fn a_cpu_feature_this_host_lacks_is_named() {
    let Some((store, dir)) = copy_template("cpu") else {
        return;
    };
    // Pretend the snapshot was taken where every leaf-7 EBX feature bit was on.
    edit_meta(&store, &dir, |meta| {
        for word in meta["cpu"]["words"].as_array_mut().unwrap() {
            if word[0] == 7 && word[1] == 0 && word[2] == 1 {
                word[3] = serde_json::json!(u32::MAX);
            }
        }
    });
    let error = load_error(&store);
    assert!(matches!(
        error,
        StoreError::Snapshot(SnapshotError::CpuMismatch(_))
    ));
    assert!(
        error.to_string().contains("rebuild the template here"),
        "{error}"
    );
}

#[test]
fn another_format_version_is_refused() {
    let Some((store, dir)) = copy_template("format") else {
        return;
    };
    edit_meta(&store, &dir, |meta| meta["format"] = serde_json::json!(999));
    assert!(matches!(
        load_error(&store),
        StoreError::Snapshot(SnapshotError::Format { found: 999 })
    ));
}

#[test]
fn a_different_image_is_refused() {
    let Some((store, dir)) = copy_template("image") else {
        return;
    };
    edit_meta(&store, &dir, |meta| {
        meta["image_digest"] = serde_json::json!("00".repeat(32))
    });
    assert!(matches!(
        load_error(&store),
        StoreError::Snapshot(SnapshotError::ImageMismatch { .. })
    ));
}
