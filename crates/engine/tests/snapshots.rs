//! Loading a snapshot checks integrity, image and CPU compatibility before anything runs.

use std::path::{Path, PathBuf};

use forkvm_template::{SnapshotError, StoreError, TemplateStore};
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
    for file in ["memory", "state.bin", "meta.json"] {
        std::fs::copy(built.dir("python").unwrap().join(file), dir.join(file)).unwrap();
    }
    Some((store, dir))
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

fn edit_meta(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut meta);
    std::fs::write(&path, serde_json::to_string(&meta).unwrap()).unwrap();
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
    flip_byte(&dir.join("memory"), offset + 100);
    assert!(matches!(
        load_error(&store),
        StoreError::Snapshot(SnapshotError::Corrupt { file: "memory" })
    ));
}

#[test]
fn a_changed_state_byte_is_caught() {
    let Some((store, dir)) = copy_template("state") else {
        return;
    };
    flip_byte(&dir.join("state.bin"), 200);
    assert!(matches!(
        load_error(&store),
        StoreError::Snapshot(SnapshotError::Corrupt { file: "state.bin" })
    ));
}

#[test]
fn a_cpu_feature_this_host_lacks_is_named() {
    let Some((store, dir)) = copy_template("cpu") else {
        return;
    };
    // Pretend the snapshot was taken where every leaf-7 EBX feature bit was on.
    edit_meta(&dir, |meta| {
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
    edit_meta(&dir, |meta| meta["format"] = serde_json::json!(999));
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
    edit_meta(&dir, |meta| {
        meta["image_digest"] = serde_json::json!("00".repeat(32))
    });
    assert!(matches!(
        load_error(&store),
        StoreError::Snapshot(SnapshotError::ImageMismatch { .. })
    ));
}
