//! The recording **fake** [`Runner`] for tests (feature `testing`): nothing is executed; every
//! call is recorded and answered with canned output, so the order of commands and what they are
//! given can be golden-tested without root.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;

use super::{Cmd, CmdError, Output, Runner};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Program name (`ip`, `nft`, ...).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// What was fed on stdin, if anything.
    pub stdin: Option<String>,
    /// The command as given (environment and directory included).
    pub cmd: Cmd,
}

impl Call {
    /// `program arg1 arg2 ...` (arguments joined by single spaces, unquoted): what canned
    /// answers are matched against.
    pub fn line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

#[derive(Debug)]
enum Answer {
    Exit {
        code: i32,
        stdout: String,
        stderr: String,
    },
    /// The program cannot be started: an OS error of this kind.
    Unstartable(std::io::ErrorKind),
}

#[derive(Debug)]
struct Canned {
    prefix: String,
    answer: Answer,
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
        self.push(prefix, exit(code, stdout, stderr), None)
    }

    /// Like [`respond`](Self::respond), but only for the next matching call.
    pub fn respond_once(&self, prefix: &str, code: i32, stdout: &str, stderr: &str) -> &Self {
        self.push(prefix, exit(code, stdout, stderr), Some(1))
    }

    /// Like [`respond`](Self::respond), but only for the next `n` matching calls.
    pub fn respond_n(&self, n: usize, prefix: &str, code: i32, out: &str, err: &str) -> &Self {
        self.push(prefix, exit(code, out, err), Some(n))
    }

    /// Every call whose line starts with `prefix` cannot be started (an OS error of `kind`, e.g.
    /// `NotFound` for a program that is not installed).
    pub fn unstartable(&self, prefix: &str, kind: std::io::ErrorKind) -> &Self {
        self.push(prefix, Answer::Unstartable(kind), None)
    }

    fn push(&self, prefix: &str, answer: Answer, remaining: Option<usize>) -> &Self {
        self.canned.lock().unwrap().push(Canned {
            prefix: prefix.to_string(),
            answer,
            remaining,
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

    /// All calls so far as [`Cmd::line`]s (arguments with spaces quoted).
    pub fn rendered(&self) -> Vec<String> {
        self.calls().iter().map(|c| c.cmd.line()).collect()
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

fn exit(code: i32, stdout: &str, stderr: &str) -> Answer {
    Answer::Exit {
        code,
        stdout: stdout.to_string(),
        stderr: stderr.to_string(),
    }
}

impl Runner for RecordingRunner {
    fn run(&self, cmd: &Cmd) -> Result<Output, CmdError> {
        let call = Call {
            program: cmd.program().to_string(),
            args: cmd.get_args().to_vec(),
            stdin: cmd.input().map(str::to_string),
            cmd: cmd.clone(),
        };
        let line = call.line();
        self.calls.lock().unwrap().push(call);
        let mut canned = self.canned.lock().unwrap();
        let hit = canned
            .iter_mut()
            .rev()
            .find(|c| line.starts_with(&c.prefix) && c.remaining != Some(0));
        let Some(c) = hit else {
            return Ok(output(0, "", ""));
        };
        if let Some(n) = c.remaining.as_mut() {
            *n -= 1;
        }
        match &c.answer {
            Answer::Exit {
                code,
                stdout,
                stderr,
            } => Ok(output(*code, stdout, stderr)),
            Answer::Unstartable(kind) => Err(CmdError::Spawn {
                program: cmd.program().to_string(),
                command: cmd.line(),
                source: (*kind).into(),
            }),
        }
    }
}

fn output(code: i32, stdout: &str, stderr: &str) -> Output {
    Output {
        status: ExitStatus::from_raw(code << 8),
        stdout: stdout.as_bytes().to_vec(),
        stderr: stderr.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_answers() {
        let r = RecordingRunner::new();
        r.respond("ip link", 2, "", "boom")
            .respond_once("ip link show", 0, "one", "")
            .unstartable("nft", std::io::ErrorKind::NotFound);
        let show = Cmd::new("ip").args(["link", "show"]);
        assert_eq!(r.run(&show).unwrap().stdout_text(), "one");
        assert_eq!(r.run(&show).unwrap().complaint(), "boom");
        assert!(r.run(&Cmd::new("nft")).unwrap_err().is_not_found());
        let fed = Cmd::new("sh").args(["-c", "a b"]).stdin("in");
        assert!(r.run(&fed).unwrap().success());
        assert_eq!(
            r.lines(),
            ["ip link show", "ip link show", "nft", "sh -c a b"]
        );
        assert_eq!(r.rendered()[3], r#"sh -c "a b""#);
        assert_eq!(r.stdins(), ["in"]);
        r.clear();
        assert!(r.calls().is_empty());
    }
}
