//! `/proc/mounts` and `mountinfo` fields, as the kernel escapes them.

/// Undoes the octal escapes of a `/proc/mounts` or `mountinfo` field (`\040` for a space,
/// `\134` for a backslash, …); anything else is kept as it is.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_only() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        // 8 and 9 are not octal digits; a short escape stays.
        assert_eq!(unescape("/x\\089/y\\04"), "/x\\089/y\\04");
    }
}
