//! CPU features a snapshot depends on.
//!
//! A snapshot holds a process that already chose its code paths: glibc picked AVX-512 or
//! AVX2 string functions at startup, numpy dispatched its SIMD kernels, and the saved XSAVE
//! area may hold AVX-512 registers. Loading it where those features are missing would fail
//! later, at some random instruction; so a snapshot records the CPUID feature words and
//! XCR0 it was taken under, and loading requires the host to offer all of them.

use forkvm_vmm::CpuTemplate;
use serde::{Deserialize, Serialize};

/// CPUID feature words a snapshot records: (leaf, subleaf, register index 0=eax..3=edx).
const FEATURE_WORDS: &[(u32, u32, usize)] = &[
    (0x1, 0, 2),
    (0x1, 0, 3),
    (0x7, 0, 1),
    (0x7, 0, 2),
    (0x7, 0, 3),
    (0x7, 1, 0),
    (0xd, 1, 0),
    (0x8000_0001, 0, 2),
    (0x8000_0001, 0, 3),
];

/// Names of the features most likely to differ between hosts, for error messages.
const NAMES: &[((u32, u32, usize), u32, &str)] = &[
    ((0x1, 0, 2), 12, "fma"),
    ((0x1, 0, 2), 19, "sse4.1"),
    ((0x1, 0, 2), 20, "sse4.2"),
    ((0x1, 0, 2), 26, "xsave"),
    ((0x1, 0, 2), 28, "avx"),
    ((0x1, 0, 2), 29, "f16c"),
    ((0x7, 0, 1), 3, "bmi1"),
    ((0x7, 0, 1), 5, "avx2"),
    ((0x7, 0, 1), 8, "bmi2"),
    ((0x7, 0, 1), 16, "avx512f"),
    ((0x7, 0, 1), 17, "avx512dq"),
    ((0x7, 0, 1), 21, "avx512ifma"),
    ((0x7, 0, 1), 28, "avx512cd"),
    ((0x7, 0, 1), 30, "avx512bw"),
    ((0x7, 0, 1), 31, "avx512vl"),
    ((0x7, 0, 2), 1, "avx512vbmi"),
    ((0x7, 0, 2), 6, "avx512vbmi2"),
    ((0x7, 0, 2), 11, "avx512vnni"),
    ((0x7, 0, 2), 14, "avx512vpopcntdq"),
    ((0x7, 1, 0), 5, "avx512bf16"),
];

/// The features a snapshot was taken under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// `(leaf, subleaf, register, value)` for each recorded feature word.
    pub words: Vec<(u32, u32, u8, u32)>,
    /// Extended state components enabled (XCR0).
    pub xcr0: u64,
}

impl CpuFeatures {
    /// The features this host's KVM offers guests.
    pub fn of(cpu: &CpuTemplate) -> CpuFeatures {
        let entries = cpu.cpuid.as_slice();
        let words = FEATURE_WORDS
            .iter()
            .map(|&(leaf, subleaf, reg)| {
                let value = entries
                    .iter()
                    .find(|e| e.function == leaf && e.index == subleaf)
                    .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg]);
                (leaf, subleaf, reg as u8, value)
            })
            .collect();
        CpuFeatures {
            words,
            xcr0: cpu.xcr0,
        }
    }

    /// Names of the features `self` (a snapshot) needs that `host` lacks; empty if it can
    /// be loaded here.
    pub fn missing_on(&self, host: &CpuFeatures) -> Vec<String> {
        let mut missing = Vec::new();
        for &(leaf, subleaf, reg, needed) in &self.words {
            let have = host
                .words
                .iter()
                .find(|w| (w.0, w.1, w.2) == (leaf, subleaf, reg))
                .map_or(0, |w| w.3);
            let absent = needed & !have;
            for bit in (0..32).filter(|b| absent & (1 << b) != 0) {
                let name = NAMES
                    .iter()
                    .find(|(word, b, _)| *word == (leaf, subleaf, reg as usize) && *b == bit)
                    .map(|(_, _, name)| (*name).to_string());
                missing.push(name.unwrap_or_else(|| {
                    format!(
                        "cpuid {leaf:#x}.{subleaf} {} bit {bit}",
                        ["eax", "ebx", "ecx", "edx"][reg as usize]
                    )
                }));
            }
        }
        let absent_state = self.xcr0 & !host.xcr0;
        if absent_state != 0 {
            missing.push(format!("XSAVE state components {absent_state:#x} (XCR0)"));
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(ebx7: u32, xcr0: u64) -> CpuFeatures {
        CpuFeatures {
            words: vec![(0x1, 0, 2, 1 << 28), (0x7, 0, 1, ebx7)],
            xcr0,
        }
    }

    #[test]
    fn subset_loads() {
        let snapshot = features(1 << 5, 0x7);
        let host = features((1 << 5) | (1 << 16), 0xe7);
        assert!(snapshot.missing_on(&host).is_empty());
    }

    #[test]
    fn missing_avx512_is_named() {
        let snapshot = features((1 << 5) | (1 << 16), 0xe7);
        let host = features(1 << 5, 0x7);
        let missing = snapshot.missing_on(&host);
        assert_eq!(missing[0], "avx512f");
        assert!(missing[1].contains("XCR0"), "{missing:?}");
    }
}
