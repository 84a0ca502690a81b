//! What is mounted where, from `/proc/self/mountinfo` (read, never a command).

use std::path::Path;

use wick_host::mounts::unescape;

/// One mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub target: String,
    pub fstype: String,
    pub source: String,
}

/// The top mount at `target` in this process's mount namespace, if any.
pub(crate) fn mount_at(target: &Path) -> Option<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = target.to_string_lossy();
    parse(&text).into_iter().rev().find(|m| m.target == target)
}

/// Parses mountinfo lines: `ID PARENT MAJ:MIN ROOT TARGET OPTS [TAGS...] - FSTYPE SOURCE SUPER`.
pub(crate) fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let target = head.split(' ').nth(4)?;
            let mut t = tail.split(' ');
            Some(Mount {
                target: unescape(target),
                fstype: t.next()?.to_string(),
                source: unescape(t.next()?),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    90 22 7:3 / /s/xfs-pool/mnt rw,nosuid master:3 - xfs /dev/loop3 rw,attr2\n\
                    91 22 7:4 / /a\\040b rw - xfs /dev/loop4 rw\n";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1],
            Mount {
                target: "/s/xfs-pool/mnt".into(),
                fstype: "xfs".into(),
                source: "/dev/loop3".into()
            }
        );
        assert_eq!(m[2].target, "/a b");
        assert!(mount_at(Path::new("/")).is_some(), "/ is mounted");
        assert!(mount_at(Path::new("/no/such/mount/point")).is_none());
    }
}
