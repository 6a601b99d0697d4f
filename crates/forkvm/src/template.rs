//! `forkvm template build|list|show|rm`.

use anyhow::Result;
use forkvm_template::{SnapshotMeta, TemplateSpec, TemplateStore};
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
         entry:       {}\n\
         memory:      {:.1} MiB stored of {} MiB guest RAM ({} extents)\n\
         image:       {} (digest {})\n\
         cpu:         XCR0 {:#x}\n\
         created:     {} (unix)\n\
         format:      {}\n",
        meta.entry.join(" "),
        meta.memory_bytes() as f64 / (1 << 20) as f64,
        meta.ram_bytes >> 20,
        meta.memory_extents.len(),
        meta.image_path.display(),
        &meta.image_digest[..16.min(meta.image_digest.len())],
        meta.cpu.xcr0,
        meta.created_unix,
        meta.format
    )
}
