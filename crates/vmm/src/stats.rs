//! KVM's own counters for one VM and its vCPU (the binary statistics of
//! `KVM_GET_STATS_FD`): exits, guest page faults the shadow MMU handled, shadow pages made
//! and zapped. `forkvm bench fork --breakdown` reads them around a request to say where a
//! fresh VM's time goes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// The most statistics read from one descriptor (KVM has about a hundred).
const MAX_STATS: u32 = 4096;

/// Counter name to value (histograms summed).
pub type Counters = BTreeMap<String, u64>;

/// Reads every statistic of the KVM object (VM or vCPU) behind `fd`.
pub fn read(fd: &impl AsRawFd) -> io::Result<Counters> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor we own.
    let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(raw) };
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4"));
    let (name_size, count) = (word(&header, 1), word(&header, 2));
    let (desc_offset, data_offset) = (word(&header, 4) as u64, word(&header, 5) as u64);
    if count > MAX_STATS || name_size > 1024 {
        return Err(io::Error::other("implausible KVM statistics header"));
    }
    // Each descriptor: flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
    let desc_len = 16 + name_size as usize;
    let mut descs = vec![0u8; desc_len * count as usize];
    file.read_exact_at(&mut descs, desc_offset)?;
    let mut counters = Counters::new();
    for desc in descs.chunks_exact(desc_len) {
        let size = u16::from_le_bytes([desc[6], desc[7]]) as usize;
        let offset = word(desc, 2) as u64;
        let name = &desc[16..];
        let name = String::from_utf8_lossy(
            &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())],
        )
        .into_owned();
        if size == 0 || size > 1024 {
            continue;
        }
        let mut values = vec![0u8; size * 8];
        file.read_exact_at(&mut values, data_offset + offset)?;
        let total = values
            .chunks_exact(8)
            .map(|v| u64::from_le_bytes(v.try_into().expect("8")))
            .fold(0u64, u64::wrapping_add);
        counters.insert(name, total);
    }
    Ok(counters)
}

/// `after - before`, counter by counter (counters that only grow).
pub fn delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .map(|(name, &value)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), value.wrapping_sub(was))
        })
        .collect()
}
