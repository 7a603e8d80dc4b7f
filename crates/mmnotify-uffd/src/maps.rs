//! This process's memory map, as the kernel reports it in `/proc/self/smaps`.
//!
//! The watcher registers *whole VMAs* (registering a sub-range would split the VMA, and every
//! split costs one of `vm.max_map_count` entries), so it needs the VMAs that overlap a range:
//! their bounds, permissions, what backs them (anonymous, a file, a special mapping such as
//! `[vdso]`) and whether some userfaultfd already has them in write-protect mode (the `uw` flag
//! of `VmFlags`). The cooperative wrappers use the same table to find where a file is mapped
//! (device, inode and offset) before punching a hole in it or truncating it.
//!
//! The table is a snapshot: another thread may change the mapping right after it was read.
//! Callers treat it as a hint and let the kernel have the last word (a registration of a range
//! that is no longer mapped fails, and the failure is reported).

use std::fs;
use std::io;

/// One VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// First address after.
    pub end: u64,
    /// `r`, `w`, `x` and `p`/`s` as in `/proc/self/maps`.
    pub perms: [u8; 4],
    /// Offset into the backing file, in bytes.
    pub offset: u64,
    /// Device of the backing file, as `major:minor` (hex, as printed).
    pub dev: String,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[vdso]`, `/memfd:x (deleted)`), empty for anonymous
    /// memory.
    pub name: String,
    /// Whether `VmFlags` lists `uw`: registered with some userfaultfd in write-protect mode.
    pub uffd_wp: bool,
}

impl Vma {
    /// Whether the VMA is one of the kernel's special mappings (`[vdso]`, `[vvar]`,
    /// `[vvar_vclock]`, `[vsyscall]`), which userfaultfd cannot register.
    pub fn is_special(&self) -> bool {
        matches!(
            self.name.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]"
        )
    }

    /// Whether the VMA maps a file (memfd and SysV shm included); `false` for anonymous
    /// memory, the heap and the stacks.
    pub fn is_file(&self) -> bool {
        self.inode != 0
    }

    /// Whether the mapping is shared (`s` in the permissions).
    pub fn is_shared(&self) -> bool {
        self.perms[3] == b's'
    }

    /// Whether it is writable.
    pub fn is_writable(&self) -> bool {
        self.perms[1] == b'w'
    }

    /// Whether it is a SysV shared-memory attach (`/SYSV<key> (deleted)`).
    pub fn is_sysv_shm(&self) -> bool {
        self.name.starts_with("/SYSV")
    }
}

fn parse_header(line: &str) -> Option<Vma> {
    let mut it = line.split_ascii_whitespace();
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let name = it.collect::<Vec<_>>().join(" ");
    let (s, e) = range.split_once('-')?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return None;
    }
    Some(Vma {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms: [p[0], p[1], p[2], p[3]],
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_string(),
        inode: inode.parse().ok()?,
        name,
        uffd_wp: false,
    })
}

/// Parses the text of `/proc/<pid>/smaps` (or `maps`, which then has no `VmFlags`).
pub fn parse(text: &str) -> Vec<Vma> {
    let mut out: Vec<Vma> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.uffd_wp = flags.split_ascii_whitespace().any(|f| f == "uw");
            }
            continue;
        }
        // A header line starts with a hex range `start-end`; attribute lines start with a
        // capitalised key followed by a colon.
        let first = line.split_ascii_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            if let Some(v) = parse_header(line) {
                out.push(v);
            }
        }
    }
    out
}

/// Reads this process's VMAs with their `VmFlags`.
pub fn read_self() -> io::Result<Vec<Vma>> {
    Ok(parse(&fs::read_to_string("/proc/self/smaps")?))
}

/// Reads this process's VMAs without flags (cheaper: no page-table walk).
pub fn read_self_maps() -> io::Result<Vec<Vma>> {
    Ok(parse(&fs::read_to_string("/proc/self/maps")?))
}

/// The VMAs that overlap `[start, end)`, in address order.
pub fn overlapping(vmas: &[Vma], start: u64, end: u64) -> Vec<Vma> {
    vmas.iter()
        .filter(|v| v.start < end && start < v.end)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 
Size:                 16 kB
VmFlags: rd wr mr mw me ac uw 
7f0000004000-7f0000005000 r--s 00002000 00:01 1234                       /memfd:x (deleted)
Size:                  4 kB
VmFlags: rd sh mr mw me ms 
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd 
";

    #[test]
    fn parses_headers_flags_and_names() {
        let v = parse(SAMPLE);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].start, 0x7f00_0000_0000);
        assert_eq!(v[0].end, 0x7f00_0000_4000);
        assert!(v[0].uffd_wp && !v[0].is_file() && v[0].is_writable());
        assert_eq!(v[1].name, "/memfd:x (deleted)");
        assert_eq!((v[1].inode, v[1].offset), (1234, 0x2000));
        assert!(v[1].is_shared() && !v[1].uffd_wp && !v[1].is_writable());
        assert!(v[2].is_special());
        assert_eq!(overlapping(&v, 0x7f00_0000_3000, 0x7f00_0000_4800).len(), 2);
    }

    #[test]
    fn reads_this_process() {
        let v = read_self().unwrap();
        assert!(v.iter().any(|m| m.name == "[stack]"));
        assert!(v.windows(2).all(|w| w[0].end <= w[1].start));
    }
}
