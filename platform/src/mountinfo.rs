//! Fields of `/proc/self/mountinfo` and `/proc/mounts`.

/// Undoes the octal escapes the kernel writes in `/proc/mounts` fields (`\040` for a space,
/// `\011` tab, `\012` newline, `\134` backslash). A malformed escape is kept verbatim.
pub fn unescape_field(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && oct.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = oct
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::unescape_field;

    #[test]
    fn escapes_are_decoded_and_hostile_ones_kept() {
        assert_eq!(unescape_field("a\\040b"), b"a b");
        assert_eq!(unescape_field("a\\134b\\9\\"), b"a\\b\\9\\");
        // Above 0o377 does not fit a byte: kept verbatim, never an overflow.
        for s in ["\\400", "\\777", "x\\477y"] {
            assert_eq!(unescape_field(s), s.as_bytes(), "{s}");
        }
        // Trailing or short escapes.
        for s in ["\\", "a\\0", "a\\01", "\\8xx"] {
            assert_eq!(unescape_field(s), s.as_bytes(), "{s}");
        }
        assert_eq!(unescape_field("end\\011"), b"end\t");
    }
}
