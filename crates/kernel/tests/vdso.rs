//! The vDSO: a shared object glibc accepts as is (no relocations, the symbols and version it
//! looks up), mapped into every spawned program and announced in its auxiliary vector.

mod common;

use common::{Harness, Options};
use forkvm_kernel::vdso::IMAGE;
use goblin::elf::Elf;
use goblin::elf::header::ET_DYN;
use goblin::elf::program_header::{PT_DYNAMIC, PT_LOAD};

#[test]
fn the_vdso_is_a_relocation_free_shared_object_with_glibcs_symbols() {
    let elf = Elf::parse(IMAGE).expect("the vDSO parses as ELF");
    assert_eq!(elf.header.e_type, ET_DYN);
    let loads: Vec<_> = elf
        .program_headers
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .collect();
    assert_eq!(loads.len(), 1, "one segment, mapped as is");
    assert_eq!((loads[0].p_vaddr, loads[0].p_offset), (0, 0));
    assert!(loads[0].p_filesz as usize <= IMAGE.len());
    assert!(elf.program_headers.iter().any(|p| p.p_type == PT_DYNAMIC));
    assert!(elf.dynrelas.is_empty() && elf.dynrels.is_empty() && elf.pltrelocs.is_empty());
    let exported: Vec<&str> = elf
        .dynsyms
        .iter()
        .filter(|s| s.st_value != 0)
        .filter_map(|s| elf.dynstrtab.get_at(s.st_name))
        .collect();
    for name in [
        "__vdso_clock_gettime",
        "__vdso_gettimeofday",
        "__vdso_time",
        "__vdso_clock_getres",
        "__vdso_getcpu",
    ] {
        assert!(exported.contains(&name), "{name} missing from {exported:?}");
    }
    let versions = elf.verdef.as_ref().expect("symbol versions");
    let mut names: Vec<&str> = Vec::new();
    for version in versions.iter() {
        for aux in version.iter() {
            names.extend(elf.dynstrtab.get_at(aux.vda_name));
        }
    }
    assert!(names.contains(&"LINUX_2.6"), "versions {names:?}");
}

#[test]
fn spawned_programs_get_the_vdso_and_its_clock_page() {
    let h = Harness::with(Options {
        spawn_tiny: true,
        ..Options::default()
    });
    let placement = h.process.vdso().expect("a spawned program has a vDSO");
    assert_eq!(placement.image, placement.clock_page + 4096);
    let space = h.process.address_space();
    let image = space.vma_at(placement.image).expect("[vdso] mapped");
    assert_eq!(image.prot, (libc::PROT_READ | libc::PROT_EXEC) as u32);
    assert!(
        space.vma_at(placement.clock_page).is_some(),
        "[vvar] mapped"
    );
    assert_eq!(h.peek(placement.image, 4), b"\x7fELF");
    // The auxiliary vector on the initial stack names it (AT_SYSINFO_EHDR = 33).
    let stack_top = space.layout().user_end;
    let words: Vec<u64> = h
        .peek(stack_top - 16384, 16384)
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect();
    assert!(
        words.windows(2).any(|w| w == [33, placement.image]),
        "AT_SYSINFO_EHDR not in the auxiliary vector"
    );
}
