//! Human sizes: `512`, `512M`, `2G`, `2GiB`, `1024K`. A bare number means MiB.

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    #[error("size is empty; use a number with an optional K, M or G suffix (e.g. 512M, 2G)")]
    Empty,
    #[error("invalid size {0:?}: use a number with an optional K, M or G suffix (e.g. 512M, 2G; a bare number means MiB)")]
    Invalid(String),
    #[error("size {0:?} must be greater than zero")]
    Zero(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
    #[error("size {0:?} is not a whole number of MiB")]
    NotWholeMib(String),
}

/// Parses a size and returns it in MiB. `K` values must add up to whole MiB.
pub fn parse_size_mib(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Invalid(input.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::TooLarge(input.to_string()))?;
    let unit = unit.trim();
    let kib_per_unit: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 1024,
        "K" | "KB" | "KIB" => 1,
        "G" | "GB" | "GIB" => 1024 * 1024,
        "T" | "TB" | "TIB" => 1024 * 1024 * 1024,
        _ => return Err(SizeError::Invalid(input.to_string())),
    };
    if n == 0 {
        return Err(SizeError::Zero(input.to_string()));
    }
    let kib = n
        .checked_mul(kib_per_unit)
        .ok_or_else(|| SizeError::TooLarge(input.to_string()))?;
    if !kib.is_multiple_of(1024) {
        return Err(SizeError::NotWholeMib(input.to_string()));
    }
    Ok(kib / 1024)
}

/// Formats MiB the way `vm list` shows them: `512M`, `2G`, `1.5G`.
pub fn format_mib(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{}G", mib / 1024)
    } else if mib >= 1024 {
        format!("{:.1}G", mib as f64 / 1024.0)
    } else {
        format!("{mib}M")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("2gib"), Ok(2048));
        assert_eq!(parse_size_mib("2048K"), Ok(2));
        assert_eq!(parse_size_mib("1T"), Ok(1024 * 1024));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(parse_size_mib("lots"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size_mib("0"), Err(SizeError::Zero(_))));
        assert!(matches!(parse_size_mib("-1"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size_mib("1.5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size_mib("100K"),
            Err(SizeError::NotWholeMib(_))
        ));
        assert!(matches!(parse_size_mib(""), Err(SizeError::Empty)));
        assert!(matches!(
            parse_size_mib("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(parse_size_mib("lots")
            .unwrap_err()
            .to_string()
            .contains("\"lots\""));
    }

    #[test]
    fn formats() {
        assert_eq!(format_mib(512), "512M");
        assert_eq!(format_mib(2048), "2G");
        assert_eq!(format_mib(1536), "1.5G");
    }
}
