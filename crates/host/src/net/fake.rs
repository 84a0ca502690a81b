//! A recording fake [`Runner`] for unit tests: records every call and answers with canned output,
//! so the order of commands and the generated rules can be golden-tested without root.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Output};
use std::sync::Mutex;

use super::error::NetError;
use super::runner::Runner;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Program name (`ip`, `nft`, ...).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// What was fed on stdin, if anything.
    pub stdin: Option<String>,
}

impl Call {
    /// `program arg1 arg2 ...` (arguments joined by single spaces, unquoted).
    pub fn line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

#[derive(Debug, Clone)]
struct Canned {
    prefix: String,
    stdout: String,
    stderr: String,
    code: i32,
    /// `None` = answer forever; `Some(n)` = answer the next `n` matching calls.
    remaining: Option<usize>,
}

/// A fake runner (**not** a real one: nothing is executed). Unmatched calls succeed with empty
/// output. Later registrations win over earlier ones for the same call.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<Call>>,
    canned: Mutex<Vec<Canned>>,
}

impl RecordingRunner {
    /// A fake where every command succeeds with empty output.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answer every call whose [`Call::line`] starts with `prefix` with this output.
    pub fn respond(&self, prefix: &str, code: i32, stdout: &str, stderr: &str) -> &Self {
        self.push(prefix, code, stdout, stderr, None)
    }

    /// Like [`respond`](Self::respond), but only for the next matching call.
    pub fn respond_once(&self, prefix: &str, code: i32, stdout: &str, stderr: &str) -> &Self {
        self.push(prefix, code, stdout, stderr, Some(1))
    }

    fn push(&self, prefix: &str, code: i32, out: &str, err: &str, n: Option<usize>) -> &Self {
        self.canned.lock().unwrap().push(Canned {
            prefix: prefix.to_string(),
            stdout: out.to_string(),
            stderr: err.to_string(),
            code,
            remaining: n,
        });
        self
    }

    /// All calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// All calls so far as [`Call::line`]s.
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Call::line).collect()
    }

    /// Stdin of every call that had one, in order.
    pub fn stdins(&self) -> Vec<String> {
        self.calls().into_iter().filter_map(|c| c.stdin).collect()
    }

    /// Forget the recorded calls (canned answers stay).
    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl Runner for RecordingRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, NetError> {
        let call = Call {
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.map(str::to_string),
        };
        let line = call.line();
        self.calls.lock().unwrap().push(call);
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
