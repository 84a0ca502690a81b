//! A recording **fake** [`Runner`] for unit tests: nothing is executed; every call is recorded and
//! answered with canned output, so command order and generated tables can be golden-tested.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};
use std::sync::Mutex;

use crate::error::Result;
use crate::runner::{render, Runner};

#[derive(Debug)]
struct Canned {
    prefix: String,
    code: i32,
    stdout: String,
    stderr: String,
    /// `None` = forever; `Some(n)` = the next `n` matching calls.
    remaining: Option<usize>,
}

/// Fake runner: unmatched calls succeed with empty output; later registrations win.
#[derive(Debug, Default)]
pub struct FakeRunner {
    calls: Mutex<Vec<String>>,
    canned: Mutex<Vec<Canned>>,
}

impl FakeRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answer every call whose rendered line starts with `prefix`.
    pub fn respond(&self, prefix: &str, code: i32, stdout: &str, stderr: &str) -> &Self {
        self.push(prefix, code, stdout, stderr, None)
    }

    /// Answer the next `n` calls whose rendered line starts with `prefix`.
    pub fn respond_n(
        &self,
        n: usize,
        prefix: &str,
        code: i32,
        stdout: &str,
        stderr: &str,
    ) -> &Self {
        self.push(prefix, code, stdout, stderr, Some(n))
    }

    fn push(&self, prefix: &str, code: i32, out: &str, err: &str, n: Option<usize>) -> &Self {
        self.canned.lock().unwrap().push(Canned {
            prefix: prefix.into(),
            code,
            stdout: out.into(),
            stderr: err.into(),
            remaining: n,
        });
        self
    }

    /// Every call so far, rendered as `program arg...`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Forget the recorded calls (keeps the canned answers).
    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl Runner for FakeRunner {
    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let line = render(program, args);
        self.calls.lock().unwrap().push(line.clone());
        let mut canned = self.canned.lock().unwrap();
        let hit = canned
            .iter_mut()
            .rev()
            .find(|c| line.starts_with(&c.prefix) && c.remaining != Some(0));
        let (code, stdout, stderr) = match hit {
            Some(c) => {
                if let Some(n) = c.remaining.as_mut() {
                    *n -= 1;
                }
                (c.code, c.stdout.clone(), c.stderr.clone())
            }
            None => (0, String::new(), String::new()),
        };
        Ok(Output {
            status: ExitStatus::from_raw(code << 8),
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        })
    }
}
