//! The initial process stack the System V x86-64 ABI promises at the entry point:
//! `argc`, `argv[]`, `envp[]`, the auxiliary vector, and the strings they point to.

/// Auxiliary-vector keys we supply (values from `<elf.h>`).
pub mod auxv {
    pub const AT_NULL: u64 = 0;
    pub const AT_PHDR: u64 = 3;
    pub const AT_PHENT: u64 = 4;
    pub const AT_PHNUM: u64 = 5;
    pub const AT_PAGESZ: u64 = 6;
    pub const AT_BASE: u64 = 7;
    pub const AT_FLAGS: u64 = 8;
    pub const AT_ENTRY: u64 = 9;
    pub const AT_UID: u64 = 11;
    pub const AT_EUID: u64 = 12;
    pub const AT_GID: u64 = 13;
    pub const AT_EGID: u64 = 14;
    pub const AT_PLATFORM: u64 = 15;
    pub const AT_HWCAP: u64 = 16;
    pub const AT_CLKTCK: u64 = 17;
    pub const AT_SECURE: u64 = 23;
    pub const AT_RANDOM: u64 = 25;
    pub const AT_HWCAP2: u64 = 26;
    pub const AT_EXECFN: u64 = 31;
    pub const AT_SYSINFO_EHDR: u64 = 33;
    pub const AT_MINSIGSTKSZ: u64 = 51;
}

/// Everything that goes on the initial stack.
pub struct StackSpec<'a> {
    pub argv: &'a [Vec<u8>],
    pub envp: &'a [Vec<u8>],
    /// Auxiliary entries except AT_RANDOM, AT_PLATFORM, AT_EXECFN and AT_NULL, which are
    /// added here because they point into the stack.
    pub auxv: &'a [(u64, u64)],
    pub random: [u8; 16],
    pub execfn: &'a [u8],
}

/// A stack image: `bytes` go at `base`, and the program starts with `rsp`.
pub struct StackImage {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub rsp: u64,
}

/// Lays the stack out downward from `top`. Returns None if it would need more than
/// `max_size` bytes.
pub fn build(top: u64, spec: &StackSpec<'_>, max_size: u64) -> Option<StackImage> {
    // Strings and data, packed downward from the top.
    let mut blob: Vec<u8> = Vec::new();
    let mut place = |data: &[u8], nul: bool| -> usize {
        // Offsets are from the end of the blob; resolved to addresses below.
        blob.splice(0..0, data.iter().copied().chain(nul.then_some(0)));
        blob.len()
    };
    let execfn = place(spec.execfn, true);
    let env: Vec<usize> = spec.envp.iter().map(|e| place(e, true)).collect();
    let args: Vec<usize> = spec.argv.iter().map(|a| place(a, true)).collect();
    let platform = place(b"x86_64", true);
    let random = place(&spec.random, false);

    let strings_len = blob.len() as u64;
    let strings_base = top.checked_sub(strings_len)?;
    let addr = |from_end: usize| top - from_end as u64;

    let mut auxv: Vec<(u64, u64)> = spec.auxv.to_vec();
    auxv.push((auxv::AT_RANDOM, addr(random)));
    auxv.push((auxv::AT_PLATFORM, addr(platform)));
    auxv.push((auxv::AT_EXECFN, addr(execfn)));
    auxv.push((auxv::AT_NULL, 0));

    let words = 1 + args.len() + 1 + env.len() + 1 + 2 * auxv.len();
    let table_len = words as u64 * 8;
    let rsp = strings_base.checked_sub(table_len)? & !0xf;
    let base = rsp;
    if top - base > max_size {
        return None;
    }

    let mut table: Vec<u8> = Vec::with_capacity(table_len as usize);
    let mut push = |v: u64| table.extend_from_slice(&v.to_le_bytes());
    push(spec.argv.len() as u64);
    args.iter().for_each(|&a| push(addr(a)));
    push(0);
    env.iter().for_each(|&e| push(addr(e)));
    push(0);
    for (k, v) in auxv {
        push(k);
        push(v);
    }

    let mut bytes = vec![0u8; (top - base) as usize];
    bytes[..table.len()].copy_from_slice(&table);
    let strings_at = (strings_base - base) as usize;
    bytes[strings_at..].copy_from_slice(&blob);
    Some(StackImage { base, bytes, rsp })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(img: &StackImage, addr: u64) -> u64 {
        let at = (addr - img.base) as usize;
        u64::from_le_bytes(img.bytes[at..at + 8].try_into().unwrap())
    }

    fn cstr(img: &StackImage, addr: u64) -> Vec<u8> {
        let at = (addr - img.base) as usize;
        img.bytes[at..]
            .iter()
            .take_while(|&&b| b != 0)
            .copied()
            .collect()
    }

    #[test]
    fn layout_matches_abi() {
        let argv = vec![b"/usr/bin/python3".to_vec(), b"-c".to_vec()];
        let envp = vec![b"A=1".to_vec()];
        let spec = StackSpec {
            argv: &argv,
            envp: &envp,
            auxv: &[(auxv::AT_PAGESZ, 4096)],
            random: [7; 16],
            execfn: b"/usr/bin/python3",
        };
        let img = build(0x8000_0000, &spec, 1 << 20).unwrap();
        assert_eq!(img.rsp % 16, 0);
        assert_eq!(word(&img, img.rsp), 2);
        assert_eq!(cstr(&img, word(&img, img.rsp + 8)), b"/usr/bin/python3");
        assert_eq!(cstr(&img, word(&img, img.rsp + 16)), b"-c");
        assert_eq!(word(&img, img.rsp + 24), 0);
        assert_eq!(cstr(&img, word(&img, img.rsp + 32)), b"A=1");
        assert_eq!(word(&img, img.rsp + 40), 0);
        // auxv
        let mut at = img.rsp + 48;
        let mut seen_random = false;
        loop {
            let (k, v) = (word(&img, at), word(&img, at + 8));
            if k == auxv::AT_NULL {
                break;
            }
            if k == auxv::AT_RANDOM {
                let off = (v - img.base) as usize;
                assert_eq!(&img.bytes[off..off + 16], &[7; 16]);
                seen_random = true;
            }
            at += 16;
        }
        assert!(seen_random);
    }

    #[test]
    fn refuses_oversized() {
        let big = vec![vec![b'x'; 4096]; 10];
        let spec = StackSpec {
            argv: &big,
            envp: &[],
            auxv: &[],
            random: [0; 16],
            execfn: b"x",
        };
        assert!(build(0x10_0000, &spec, 8192).is_none());
    }
}
