//! VM names: DNS labels, validated strictly, never silently normalised.

use rand::seq::SliceRandom;
use thiserror::Error;

/// Longest allowed name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Why a VM name was refused. Messages name the offending character and position.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("VM name is empty; use 1-63 characters a-z, 0-9 and '-'")]
    Empty,
    #[error("VM name is {len} characters long; the limit is 63")]
    TooLong { len: usize },
    #[error(
        "VM name {name:?} has invalid character {ch:?} at position {pos}; use lowercase a-z, 0-9 and '-'"
    )]
    InvalidChar { name: String, ch: char, pos: usize },
    #[error("VM name {name:?} must not start or end with '-'")]
    EdgeHyphen { name: String },
    #[error(
        "VM name {name:?} could be taken for a VM id or id prefix ({min} to {max} hex digits); \
         add a letter g-z or a '-'"
    )]
    LooksLikeId {
        name: String,
        min: usize,
        max: usize,
    },
}

/// Checks `name` against the DNS-label rules: lowercase a–z, 0–9 and `-`, 1–63 characters, no
/// leading or trailing `-`. Positions in errors are 1-based.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong { len });
    }
    for (i, ch) in name.chars().enumerate() {
        if !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-') {
            return Err(NameError::InvalidChar {
                name: name.to_string(),
                ch,
                pos: i + 1,
            });
        }
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::EdgeHyphen {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// Checks a VM name: [`validate_name`], and not something a lookup could take for a VM id or id
/// prefix ([`crate::vm::looks_like_id`]), so `vm show REF` never means two VMs.
pub fn validate_vm_name(name: &str) -> Result<(), NameError> {
    validate_name(name)?;
    if crate::vm::looks_like_id(name) {
        return Err(NameError::LooksLikeId {
            name: name.to_string(),
            min: crate::vm::MIN_ID_PREFIX,
            max: crate::vm::ID_LEN,
        });
    }
    Ok(())
}

const ADJECTIVES: &[&str] = &[
    "amber", "bold", "brave", "brisk", "calm", "clever", "cosy", "crisp", "dapper", "eager",
    "fair", "fancy", "fleet", "gentle", "glad", "golden", "happy", "hardy", "jolly", "keen",
    "kind", "lively", "lucky", "merry", "mild", "misty", "nimble", "noble", "plucky", "proud",
    "quick", "quiet", "rapid", "rosy", "rustic", "shiny", "silent", "sleek", "snowy", "spry",
    "steady", "sunny", "swift", "tidy", "vivid", "warm", "wise", "witty", "zesty", "zippy",
];
const NOUNS: &[&str] = &[
    "badger", "beaver", "bison", "crane", "dingo", "eagle", "falcon", "ferret", "finch", "fox",
    "gecko", "heron", "ibex", "jackal", "koala", "lemur", "lynx", "marten", "mink", "moose",
    "newt", "ocelot", "orca", "otter", "owl", "panda", "puffin", "quail", "raven", "robin",
    "salmon", "seal", "shrew", "sloth", "stoat", "swan", "tapir", "tern", "tiger", "toad", "trout",
    "viper", "vole", "walrus", "weasel", "whale", "wolf", "wombat", "wren", "yak",
];

/// A random `adjective-noun` name (e.g. `calm-otter`). Callers retry or add a suffix on collision.
pub fn generate_name() -> String {
    let mut rng = rand::thread_rng();
    format!(
        "{}-{}",
        ADJECTIVES.choose(&mut rng).expect("non-empty"),
        NOUNS.choose(&mut rng).expect("non-empty")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "a1", "calm-otter", "0", &"a".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_with_position() {
        let e = validate_name("Ab").unwrap_err();
        assert_eq!(
            e,
            NameError::InvalidChar {
                name: "Ab".into(),
                ch: 'A',
                pos: 1
            }
        );
        assert!(e.to_string().contains("'A' at position 1"), "{e}");
        let e = validate_name("ab_c").unwrap_err();
        assert!(e.to_string().contains("'_' at position 3"), "{e}");
        assert!(matches!(
            validate_name("-bad"),
            Err(NameError::EdgeHyphen { .. })
        ));
        assert!(matches!(
            validate_name("bad-"),
            Err(NameError::EdgeHyphen { .. })
        ));
        assert_eq!(
            validate_name(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64 })
        );
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_name("é"),
            Err(NameError::InvalidChar { pos: 1, .. })
        ));
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..200 {
            let n = generate_name();
            validate_vm_name(&n).unwrap();
        }
    }

    #[test]
    fn vm_names_never_look_like_ids() {
        let id = crate::new_vm_id();
        for bad in [id.as_str(), &id[..12], &id[..4], "cafe", "deadbeef", "0123"] {
            let e = validate_vm_name(bad).unwrap_err();
            assert!(matches!(e, NameError::LooksLikeId { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("id prefix"), "{e}");
        }
        // Too short for a prefix lookup, too long for an id, or not all hex: plain names.
        let long_hex = "a".repeat(33);
        for ok in ["a", "0", "abc", "cafe-1", "coffee", long_hex.as_str()] {
            assert_eq!(validate_vm_name(ok), Ok(()), "{ok}");
        }
    }
}
