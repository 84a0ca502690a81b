//! Skipped tests, said out loud.
//!
//! libtest has no "skipped at run time": a test that cannot run here returns early and is
//! reported `ok`. So every such test calls [`skip`] first, which prints `SKIP: <test>: <reason>`
//! straight to stderr (not through libtest's output capture, so it shows in every run) and, when
//! `WICK_TEST_SKIP_LOG` names a file, appends the same line there. `./scripts/test` sets that
//! file, lists what was skipped at the end of the run and does not count those tests as passed.

use std::io::Write;

/// The environment variable naming the file that collects `SKIP:` lines.
pub const SKIP_LOG_ENV: &str = "WICK_TEST_SKIP_LOG";

/// Reports that the running test (named after its libtest thread) is skipped, and why.
pub fn skip(why: impl std::fmt::Display) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    let line = format!("SKIP: {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        // One write with O_APPEND: lines from parallel tests never interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_logged_with_the_test_name() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        // Only this test reads the variable in this process's test binary.
        std::env::set_var(SKIP_LOG_ENV, &log);
        skip("because");
        std::env::remove_var(SKIP_LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text,
            "SKIP: skip::tests::a_skip_is_logged_with_the_test_name: because\n"
        );
    }
}
