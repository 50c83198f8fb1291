//! /proc text (`/proc/<pid>/cgroup`, `/proc/<pid>/stat`, `/proc/stat`) and cgroup paths on
//! their way into nft scripts: parsers never panic, and a path the validator accepts can be
//! placed in a double-quoted nft string without changing the script's meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use platform::cgroup::{self, NftCgroupPath};
use platform::vitals::CpuTimes;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(path) = cgroup::parse_proc_cgroup(&text) {
        assert!(!path.contains('\n'));
        check_path(&path);
    }
    check_path(&text);
    let _ = cgroup::parse_stat_ppid(&text);
    let _ = CpuTimes::parse_proc_stat(&text);
    let _ = cgroup::candidate_dirs("/sys/fs/cgroup", &text);
    let _ = cgroup::depth(&text);
});

fn check_path(text: &str) {
    if let Ok(p) = NftCgroupPath::new(text) {
        let s = p.as_str();
        assert!(s.bytes().all(|b| b == b'/' || cgroup::is_safe_byte(b)), "unsafe byte in {s:?}");
        assert!(!s.starts_with('/') && !s.ends_with('/'));
        assert!(s.is_empty() || s.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        assert!(s.len() <= 4000);
    }
}
