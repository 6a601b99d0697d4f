//! `forkvm template build|list|show|rm`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use forkvm_template::lock::Lock;
use forkvm_template::{SnapshotError, SnapshotMeta, StoreError, TemplateSpec, TemplateStore};
use forkvm_vmm::Vmm;

/// The store in the default cache directory.
pub fn store() -> TemplateStore {
    TemplateStore::new(&forkvm_template::rootfs::default_cache_dir())
}

/// Builds a template and prints a summary.
pub fn build(spec: &TemplateSpec) -> Result<()> {
    let vmm = Vmm::new()?;
    let started = std::time::Instant::now();
    let meta = forkvm_template::build(&store(), &vmm, spec, &mut |step| {
        eprintln!("forkvm: {step}");
    })?;
    eprintln!(
        "forkvm: template {:?} built in {:.1} s",
        spec.name,
        started.elapsed().as_secs_f64()
    );
    print!("{}", describe(&spec.name, &meta));
    Ok(())
}

/// Builds a template from a spec with a lock file: the lock is followed when `lock` exists,
/// and written from the build when it does not.
pub fn build_locked(mut spec: TemplateSpec, lock: Option<&Path>) -> Result<()> {
    let Some(path) = lock else {
        return build(&spec);
    };
    let existing = path.exists();
    if existing {
        spec.lock = Some(Lock::load(path)?);
        eprintln!("forkvm: building as {} pins it", path.display());
    }
    build(&spec)?;
    if !existing {
        let meta = store().show(&spec.name)?;
        let lock = meta.lock.context("the template recorded no lock")?;
        write_atomically(path, lock.to_toml().as_bytes())?;
        eprintln!("forkvm: wrote the lock {}", path.display());
    }
    Ok(())
}

/// Writes `data` to `path` through a temporary file in the same directory, so a crash
/// leaves the old file or the new one, never part of one.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut file = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
    file.write_all(data)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Prints a template's lock.
pub fn lock(name: &str) -> Result<()> {
    let meta = store().show(name)?;
    match meta.lock {
        Some(lock) => print!("{}", lock.to_toml()),
        None => bail!("template {name:?} was built before locks: rebuild it"),
    }
    Ok(())
}

pub fn list() -> Result<()> {
    let templates = store().list()?;
    if templates.is_empty() {
        println!("no templates (build one with `forkvm template build python`)");
    }
    for (name, meta) in templates {
        match meta {
            Ok(meta) => println!(
                "{name:<20} {:>8.1} MiB  {}",
                meta.memory_bytes() as f64 / (1 << 20) as f64,
                meta.entry.join(" ")
            ),
            Err(e) => println!("{name:<20} unreadable: {e}"),
        }
    }
    Ok(())
}

pub fn show(name: &str) -> Result<()> {
    let meta = store().show(name)?;
    print!("{}", describe(name, &meta));
    Ok(())
}

pub fn remove(name: &str) -> Result<()> {
    store().remove(name)?;
    println!("removed template {name}");
    Ok(())
}

fn describe(name: &str, meta: &SnapshotMeta) -> String {
    format!(
        "name:        {name}\n\
         runtime:     {} (runs {})\n\
         entry:       {}\n\
         memory:      {:.1} MiB stored of {} MiB guest RAM ({} extents)\n\
         image:       {} (digest {})\n\
         cpu:         XCR0 {:#x}\n\
         created:     {} (unix)\n\
         format:      {}\n{}",
        meta.runtime.name(),
        meta.runtime.languages().join(", "),
        meta.entry.join(" "),
        meta.memory_bytes() as f64 / (1 << 20) as f64,
        meta.ram_bytes >> 20,
        meta.memory_extents.len(),
        meta.image_path.display(),
        &meta.image_digest[..16.min(meta.image_digest.len())],
        meta.cpu.xcr0,
        meta.created_unix,
        meta.format,
        provenance(meta),
    )
}

/// What `template show` adds for a template built from a spec: the packages as resolved,
/// and the spec itself.
fn provenance(meta: &SnapshotMeta) -> String {
    let mut out = String::new();
    if let Some(lock) = &meta.lock {
        out.push_str(&format!("content:     {}\n", lock.content_sha256));
    }
    if !meta.packages.is_empty() {
        out.push_str(&format!("packages:    {}\n", meta.packages.join(" ")));
    }
    if let Some(spec) = &meta.spec {
        out.push_str("spec:\n");
        for line in spec.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// Builds a built-in template (`python`, `node`) if the store does not have it, or has it in a snapshot
/// format this forkvm no longer reads, with another version of the agent, or without this
/// cache's seal (it is ours to rebuild, in about a second).
pub fn ensure(name: &str, vmm: &Vmm) -> Result<()> {
    let store = store();
    let stale = match store.show(name) {
        Ok(meta) => {
            meta.agent_sha256 != forkvm_template::agent_digest()
                || !meta.sealed_by(&store.sealer()?)
        }
        Err(StoreError::NotFound(_) | StoreError::Snapshot(SnapshotError::Format { .. })) => true,
        Err(e) => bail!("{e}"),
    };
    match stale {
        false => Ok(()),
        true if name == "python" || name == "node" => {
            eprintln!("forkvm: template {name:?} missing or built by another forkvm; building it…");
            let spec = match name {
                "node" => TemplateSpec::node(name),
                _ => TemplateSpec::python(name),
            };
            forkvm_template::build(&store, vmm, &spec, &mut |step| eprintln!("forkvm: {step}"))?;
            Ok(())
        }
        // Other templates are the user's: built from their spec, which only they know.
        true => Ok(()),
    }
}
