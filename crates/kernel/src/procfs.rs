//! The `/proc/self` files that describe a program's own memory: `maps`, `smaps`,
//! `smaps_rollup` and `statm`, in the formats Linux uses (libraries parse them: threadpoolctl
//! and memory profilers among them).
//!
//! They are generated when opened, like a `seq_file` read in one go, from the address space
//! (what is mapped, how, from which file) and the host's page tables (which of those pages
//! are resident, and which are the sandbox's own rather than shared file pages).
//! Neighbouring mappings with the same attributes are shown as one, as Linux merges them.

use std::fmt::Write;

use crate::fileinfo::FS_DEV;
use crate::mm::{Vma, VmaKind};
use crate::process::Process;
use forkvm_memory::backing::Residency;
use forkvm_memory::ram::PAGE_SIZE;

/// A generated file under `/proc/self/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcFile {
    Maps,
    Smaps,
    SmapsRollup,
    Statm,
}

impl ProcFile {
    /// The file an absolute, normalized path names: `/proc/self/X`, `/proc/thread-self/X`
    /// or `/proc/<our pid>/X`.
    /// The file `path` names in the directory of process `pid` (the caller), if any.
    pub fn from_path(path: &[u8], pid: u32) -> Option<ProcFile> {
        match proc_self_entry(path, pid)? {
            b"maps" => Some(ProcFile::Maps),
            b"smaps" => Some(ProcFile::Smaps),
            b"smaps_rollup" => Some(ProcFile::SmapsRollup),
            b"statm" => Some(ProcFile::Statm),
            _ => None,
        }
    }
}

/// The part of `path` after the directory of the process itself (`pid`), if it names one.
pub fn proc_self_entry(path: &[u8], pid: u32) -> Option<&[u8]> {
    let pid_dir = format!("/proc/{pid}/");
    [
        b"/proc/self/".as_slice(),
        b"/proc/thread-self/",
        pid_dir.as_bytes(),
    ]
    .iter()
    .find_map(|prefix| path.strip_prefix(*prefix))
}

/// One line of `maps` (and the header of an `smaps` entry): a merged run of mappings.
struct Region {
    vma: Vma,
    residency: Residency,
}

impl Process {
    /// The current contents of `file`.
    pub fn proc_file(&self, file: ProcFile) -> Vec<u8> {
        let regions = self.regions();
        let mut out = String::new();
        match file {
            ProcFile::Maps => {
                for region in &regions {
                    write_header(&mut out, &region.vma, vma_name(&region.vma).as_deref());
                }
            }
            ProcFile::Smaps => {
                for region in &regions {
                    write_header(&mut out, &region.vma, vma_name(&region.vma).as_deref());
                    write_usage(&mut out, &region.vma, region.residency, false);
                }
            }
            ProcFile::SmapsRollup => {
                let first = regions.first().map_or(0, |r| r.vma.start);
                let last = regions.last().map_or(0, |r| r.vma.end);
                let all = Vma::anonymous(first, last, 0, VmaKind::Anonymous);
                write_header(&mut out, &all, Some("[rollup]"));
                let mut total = Residency::default();
                for region in &regions {
                    total.resident_pages += region.residency.resident_pages;
                    total.private_pages += region.residency.private_pages;
                }
                write_usage(&mut out, &all, total, true);
            }
            ProcFile::Statm => out = self.statm(&regions),
        }
        out.into_bytes()
    }

    /// The mappings in address order, neighbours with the same attributes merged, each with
    /// its residency. A residency the host cannot report (it always can, unless
    /// `/proc/self/pagemap` of the VMM is unreadable) shows as nothing resident.
    fn regions(&self) -> Vec<Region> {
        let mut merged: Vec<Vma> = Vec::new();
        for vma in self.mm.visible_vmas() {
            match merged.last_mut() {
                Some(last) if last.continues_into(&vma) => last.end = vma.end,
                _ => merged.push(vma),
            }
        }
        merged
            .into_iter()
            .map(|vma| {
                let residency = self.ram.residency(vma.start, vma.end).unwrap_or_default();
                Region { vma, residency }
            })
            .collect()
    }

    /// `size resident shared text lib data dt`, in pages.
    fn statm(&self, regions: &[Region]) -> String {
        let pages = |vma: &Vma| (vma.end - vma.start) / PAGE_SIZE;
        let resident: u64 = regions.iter().map(|r| r.residency.resident_pages).sum();
        let private: u64 = regions.iter().map(|r| r.residency.private_pages).sum();
        let text: u64 = regions
            .iter()
            .filter(|r| {
                r.vma.prot & libc::PROT_EXEC as u32 != 0
                    && r.vma
                        .file
                        .as_ref()
                        .is_some_and(|f| *f.path == *self.exe_path)
            })
            .map(|r| pages(&r.vma))
            .sum();
        let data: u64 = regions
            .iter()
            .filter(|r| r.vma.prot & libc::PROT_WRITE as u32 != 0 && !r.vma.shared)
            .map(|r| pages(&r.vma))
            .sum();
        format!(
            "{} {resident} {} {text} 0 {data} 0\n",
            self.mm.mapped_bytes() / PAGE_SIZE,
            resident - private
        )
    }
}

/// What `maps` shows as a mapping's name: its file, `[heap]`, `[stack]`, or nothing.
fn vma_name(vma: &Vma) -> Option<std::borrow::Cow<'_, str>> {
    match (&vma.file, vma.kind) {
        (Some(file), _) => Some(String::from_utf8_lossy(&file.path)),
        (None, VmaKind::Heap) => Some("[heap]".into()),
        (None, VmaKind::Stack) => Some("[stack]".into()),
        (None, VmaKind::Vvar) => Some("[vvar]".into()),
        (None, VmaKind::Vdso) => Some("[vdso]".into()),
        _ => None,
    }
}

/// One `maps` line: range, permissions, file offset, device, inode, and the name padded to
/// column 73 as Linux does (25 + 6 * pointer size - 1, then a space). A line without a name
/// ends in a space, as on Linux.
fn write_header(out: &mut String, vma: &Vma, name: Option<&str>) {
    let perm = |bit: i32, c: char| if vma.prot & bit as u32 != 0 { c } else { '-' };
    let (offset, dev, ino) = match &vma.file {
        Some(file) => (file.offset, FS_DEV, file.ino),
        None => (0, 0, 0),
    };
    let line_start = out.len();
    let _ = write!(
        out,
        "{:08x}-{:08x} {}{}{}{} {offset:08x} {:02x}:{:02x} {ino} ",
        vma.start,
        vma.end,
        perm(libc::PROT_READ, 'r'),
        perm(libc::PROT_WRITE, 'w'),
        perm(libc::PROT_EXEC, 'x'),
        if vma.shared { 's' } else { 'p' },
        dev >> 8,
        dev & 0xff,
    );
    if let Some(name) = name {
        let used = out.len() - line_start;
        let _ = write!(out, "{:pad$}{name}", "", pad = 73usize.saturating_sub(used));
    }
    out.push('\n');
}

/// The memory-usage lines of an `smaps` entry (or of `smaps_rollup` when `rollup`).
///
/// Shared pages are file pages of the page cache (libraries, the snapshot), which other
/// sandboxes may map too; how many do is not known here, so `Pss` counts them in full.
fn write_usage(out: &mut String, vma: &Vma, residency: Residency, rollup: bool) {
    let kib = |pages: u64| pages * (PAGE_SIZE / 1024);
    let rss = kib(residency.resident_pages);
    let private = kib(residency.private_pages);
    let shared = rss - private;
    // Private copies of file pages count as anonymous memory, as on Linux.
    let anonymous = private;
    let mut line = |name: &str, value: u64| {
        let _ = writeln!(out, "{:<16}{value:>8} kB", format!("{name}:"));
    };
    if !rollup {
        line("Size", kib((vma.end - vma.start) / PAGE_SIZE));
        line("KernelPageSize", kib(1));
        line("MMUPageSize", kib(1));
    }
    line("Rss", rss);
    line("Pss", rss);
    line("Pss_Dirty", private);
    if rollup {
        line("Pss_Anon", anonymous);
        line("Pss_File", shared);
        line("Pss_Shmem", 0);
    }
    line("Shared_Clean", shared);
    line("Shared_Dirty", 0);
    line("Private_Clean", 0);
    line("Private_Dirty", private);
    line("Referenced", rss);
    line("Anonymous", anonymous);
    line("KSM", 0);
    line("LazyFree", 0);
    line("AnonHugePages", 0);
    line("ShmemPmdMapped", 0);
    line("FilePmdMapped", 0);
    line("Shared_Hugetlb", 0);
    line("Private_Hugetlb", 0);
    line("Swap", 0);
    line("SwapPss", 0);
    line("Locked", 0);
    if !rollup {
        let eligible = u64::from(vma.file.is_none());
        let _ = writeln!(out, "THPeligible:    {eligible:>8}");
        let _ = writeln!(out, "VmFlags: {}", vm_flags(vma));
    }
}

/// The two-letter flags of an `smaps` entry's `VmFlags` line.
fn vm_flags(vma: &Vma) -> String {
    let has = |bit: i32| vma.prot & bit as u32 != 0;
    let mut flags = Vec::new();
    for (bit, flag) in [
        (libc::PROT_READ, "rd"),
        (libc::PROT_WRITE, "wr"),
        (libc::PROT_EXEC, "ex"),
    ] {
        if has(bit) {
            flags.push(flag);
        }
    }
    if vma.shared {
        flags.extend(["sh", "mr", "me", "ms"]);
    } else {
        flags.extend(["mr", "mw", "me"]);
    }
    if vma.kind == VmaKind::Stack {
        flags.push("gd");
    }
    if !vma.shared && has(libc::PROT_WRITE) {
        flags.push("ac");
    }
    flags.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_our_own_directories_only() {
        assert_eq!(
            ProcFile::from_path(b"/proc/self/maps", 1),
            Some(ProcFile::Maps)
        );
        assert_eq!(
            ProcFile::from_path(b"/proc/thread-self/smaps", 1),
            Some(ProcFile::Smaps)
        );
        let ours = "/proc/1/statm";
        assert_eq!(
            ProcFile::from_path(ours.as_bytes(), 1),
            Some(ProcFile::Statm)
        );
        assert_eq!(ProcFile::from_path(b"/proc/4242/maps", 1), None);
        assert_eq!(ProcFile::from_path(b"/proc/self/mapsx", 1), None);
        assert_eq!(ProcFile::from_path(b"/proc/self", 1), None);
    }

    #[test]
    fn flags_follow_protection_and_kind() {
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let stack = Vma::anonymous(0x1000, 0x2000, rw, VmaKind::Stack);
        assert_eq!(vm_flags(&stack), "rd wr mr mw me gd ac");
        let text = Vma::anonymous(
            0x1000,
            0x2000,
            (libc::PROT_READ | libc::PROT_EXEC) as u32,
            VmaKind::File,
        );
        assert_eq!(vm_flags(&text), "rd ex mr mw me");
    }
}
