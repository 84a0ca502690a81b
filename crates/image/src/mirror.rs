//! The Debian mirror to build from, read at run time from the machine's own apt sources (never
//! written into wick), overridable by the caller or `WICK_DEBIAN_MIRROR`.

use std::fs;
use std::path::Path;

use crate::error::{ImageError, Result};

/// Environment variable that overrides the mirror found in the apt sources.
pub const MIRROR_ENV: &str = "WICK_DEBIAN_MIRROR";

/// The mirror URI serving `suite`: `override_uri`, else `$WICK_DEBIAN_MIRROR`, else the first
/// apt source (deb822 `/etc/apt/sources.list.d/*.sources`, then one-line `sources.list` files)
/// that lists `suite`, else the first Debian source at all.
pub fn debian_mirror(override_uri: Option<&str>, suite: &str) -> Result<String> {
    if let Some(m) = override_uri.filter(|m| !m.is_empty()) {
        return Ok(m.to_string());
    }
    if let Ok(m) = std::env::var(MIRROR_ENV) {
        if !m.is_empty() {
            return Ok(m);
        }
    }
    let sources = read_sources(Path::new("/etc/apt"));
    pick(&sources, suite).ok_or_else(|| {
        ImageError::Invalid(format!(
            "no Debian mirror found in /etc/apt sources for {suite}; set {MIRROR_ENV} or the \
             image build's mirror option to a Debian mirror URI"
        ))
    })
}

/// (uri, suites) of every deb source under `etc_apt`.
fn read_sources(etc_apt: &Path) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let dir = etc_apt.join("sources.list.d");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        if let Ok(text) = fs::read_to_string(f) {
            out.extend(parse_deb822(&text));
        }
    }
    let mut lists = vec![etc_apt.join("sources.list")];
    lists.extend(
        files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "list"))
            .cloned(),
    );
    for f in lists {
        if let Ok(text) = fs::read_to_string(f) {
            out.extend(parse_one_line(&text));
        }
    }
    out
}

fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let (mut types, mut uris, mut suites, mut enabled) = (vec![], vec![], vec![], true);
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let words = v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = words,
                "uris" => uris = words,
                "suites" => suites = words,
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.iter().any(|t| t == "deb") {
            out.extend(uris.into_iter().map(|u| (u, suites.clone())));
        }
    }
    out
}

fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut words = rest.split_whitespace().peekable();
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            // Skip an options block like "[arch=amd64 signed-by=...]".
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_string(), vec![suite.to_string()]));
        }
    }
    out
}

fn pick(sources: &[(String, Vec<String>)], suite: &str) -> Option<String> {
    sources
        .iter()
        .find(|(_, s)| s.iter().any(|x| x == suite))
        .or_else(|| sources.first())
        .map(|(u, _)| u.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_prefers_the_matching_suite() {
        let text = "Types: deb\nURIs: http://security.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n\n\
                    Types: deb deb-src\nURIs: http://mirror.example/debian/\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n";
        let s = parse_deb822(text);
        assert_eq!(
            pick(&s, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn one_line_with_options() {
        let text =
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        let s = parse_one_line(text);
        assert_eq!(
            s,
            vec![("http://m.example/debian".into(), vec!["bookworm".into()])]
        );
    }

    #[test]
    fn override_wins() {
        assert_eq!(
            debian_mirror(Some("http://x.example/d"), "bookworm").unwrap(),
            "http://x.example/d"
        );
    }
}
