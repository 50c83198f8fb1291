//! mountinfo text from a hostile or odd kernel: parsing never panics, the unescaper accepts
//! any field, and the layout classification works on whatever was parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use platform::cgroup::{self, Layout};
use platform::mountinfo::unescape_field;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let unescaped = unescape_field(&text);
    assert!(unescaped.len() <= text.len(), "unescaping never grows a field");
    let mounts = cgroup::parse_mountinfo(&text);
    let layout = cgroup::layout_from_mounts(&mounts);
    if let Some(m) = cgroup::cgroup2_mount(&mounts, layout) {
        assert_eq!(m.fs_type, "cgroup2");
        assert!(matches!(layout, Layout::Unified | Layout::Hybrid));
    }
});
