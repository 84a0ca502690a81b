//! Following a long operation (a VM's, or an image or kernel job's): read its event stream,
//! show the stages, forward Ctrl-C as a cancel request, and return the operation in its
//! terminal state.
//!
//! On a terminal (stderr) a spinner shows the current stage and its elapsed time, and each
//! finished stage becomes a `✓ stage (123 ms)` line. Elsewhere each stage is one plain line:
//! `[create a1] stage: clone root disk`. Several operations at once are followed quietly.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::watch;
use wick_model::api::{ApiError, ArtifactOp, ErrorCode, OpEvent, OpKind, OpState, Operation};

use crate::client::{op_path, Client};
use crate::render::{self, duration_ms};
use crate::Exit;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Spinner and `✓` lines on stderr.
    Live,
    /// One line per stage on stderr.
    Plain,
    /// Nothing.
    Quiet,
}

impl View {
    /// [`View::Live`] when stderr is a terminal, else [`View::Plain`].
    pub fn auto() -> View {
        if std::io::stderr().is_terminal() {
            View::Live
        } else {
            View::Plain
        }
    }
}

/// What an event means for the display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A stage began.
    Enter(String),
    /// A stage ended after `ms`; `ok` is false when the operation failed or was cancelled in it.
    Done { stage: String, ms: u64, ok: bool },
    /// The operation reached a terminal state.
    Finished { state: OpState, elapsed_ms: u64 },
}

/// Turns a stream of [`OpEvent`]s into [`Step`]s. Replayed events (same or lower `seq`, as after
/// re-subscribing) are ignored.
#[derive(Debug, Default)]
pub struct StageTracker {
    current: Option<(String, u64)>,
    last_seq: Option<u64>,
    finished: bool,
}

impl StageTracker {
    pub fn on_event(&mut self, ev: &OpEvent) -> Vec<Step> {
        if self.finished || self.last_seq.is_some_and(|s| ev.seq <= s) {
            return Vec::new();
        }
        self.last_seq = Some(ev.seq);
        if ev.state.is_terminal() {
            return self.finish(ev.state, ev.elapsed_ms);
        }
        let mut steps = Vec::new();
        if let Some(stage) = &ev.stage {
            if self.current.as_ref().map(|(s, _)| s) != Some(stage) {
                if let Some((prev, started)) = self.current.take() {
                    steps.push(Step::Done {
                        stage: prev,
                        ms: ev.elapsed_ms.saturating_sub(started),
                        ok: true,
                    });
                }
                self.current = Some((stage.clone(), ev.elapsed_ms));
                steps.push(Step::Enter(stage.clone()));
            }
        }
        steps
    }

    /// Ends the current stage and the operation (also used when the terminal state is learnt
    /// from `GET /v1/operations/{id}` instead of the stream).
    pub fn finish(&mut self, state: OpState, elapsed_ms: u64) -> Vec<Step> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut steps = Vec::new();
        if let Some((stage, started)) = self.current.take() {
            steps.push(Step::Done {
                stage,
                ms: elapsed_ms.saturating_sub(started),
                ok: state == OpState::Succeeded,
            });
        }
        steps.push(Step::Finished { state, elapsed_ms });
        steps
    }
}

/// `create a1`, `import image base`: what the operation is, for prefixes and the spinner.
pub fn op_label(kind: OpKind, name: &str) -> String {
    let kind = match kind {
        OpKind::Create => "create",
        OpKind::Start => "start",
        OpKind::Stop => "stop",
        OpKind::Restart => "restart",
        OpKind::Delete => "delete",
        OpKind::Pause => "pause",
        OpKind::Resume => "resume",
        OpKind::Suspend => "suspend",
        OpKind::Snapshot => "snapshot",
        OpKind::Fork => "fork",
        OpKind::ImageImport => "import image",
        OpKind::ImagePull => "pull image",
        OpKind::ImageBuild => "build image",
        OpKind::ImageCommit => "commit image",
        OpKind::KernelImport => "import kernel",
        OpKind::KernelPull => "pull kernel",
    };
    format!("{kind} {name}")
}

/// [`op_label`] of an operation: its VM's name, or the image or kernel it makes.
pub fn label(op: &Operation) -> String {
    op_label(op.kind, target(op))
}

/// The name an operation is about.
fn target(op: &Operation) -> &str {
    match &op.artifact {
        Some(a) => &a.name,
        None => &op.vm_name,
    }
}

/// The line a [`View::Plain`] display prints for `step`, if any.
pub fn plain_line(label: &str, step: &Step) -> Option<String> {
    match step {
        Step::Enter(stage) => Some(format!("[{label}] stage: {stage}")),
        Step::Done { .. } => None,
        Step::Finished { state, elapsed_ms } => {
            let word = match state {
                OpState::Running => "running",
                OpState::Succeeded => "succeeded",
                OpState::Failed => "failed",
                OpState::Cancelled => "cancelled",
            };
            Some(format!("[{label}] {word} ({})", duration_ms(*elapsed_ms)))
        }
    }
}

/// The line a [`View::Live`] display prints above its spinner for `step`, if any.
pub fn live_line(step: &Step) -> Option<String> {
    match step {
        Step::Done { stage, ms, ok } => {
            let mark = if *ok { "✓" } else { "✗" };
            Some(format!("{mark} {stage} ({})", duration_ms(*ms)))
        }
        Step::Enter(_) | Step::Finished { .. } => None,
    }
}

/// Draws steps in one [`View`].
struct Display {
    view: View,
    label: String,
    bar: Option<ProgressBar>,
}

impl Display {
    fn new(view: View, label: String) -> Display {
        let bar = (view == View::Live).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
                    .expect("valid template")
                    .tick_strings(&["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏", "·"]),
            );
            bar.set_message(label.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Display { view, label, bar }
    }

    fn step(&self, step: &Step) {
        match self.view {
            View::Quiet => {}
            View::Plain => {
                if let Some(line) = plain_line(&self.label, step) {
                    eprintln!("{}", render::escape(&line));
                }
            }
            View::Live => {
                let Some(bar) = &self.bar else { return };
                if let Some(line) = live_line(step) {
                    bar.println(render::escape(&line));
                }
                if let Step::Enter(stage) = step {
                    bar.set_message(render::escape_inline(stage));
                    bar.reset_elapsed();
                }
            }
        }
    }

    fn note(&self, msg: &str) {
        let msg = render::escape(msg);
        match (&self.bar, self.view) {
            (Some(bar), _) => bar.println(msg),
            (None, View::Plain) => eprintln!("[{}] {msg}", self.label),
            (None, _) => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Stages of work done by the CLI itself (e.g. preparing a workspace), drawn like an
/// operation's: a spinner and `✓ stage (12 ms)` lines on a terminal, `[label] stage: ...` lines
/// elsewhere.
pub struct Stages {
    display: Display,
    current: Option<(String, std::time::Instant)>,
    started: std::time::Instant,
}

impl Stages {
    pub fn new(view: View, label: String) -> Stages {
        Stages {
            display: Display::new(view, label),
            current: None,
            started: std::time::Instant::now(),
        }
    }

    /// Ends the current stage (successfully) and begins `stage`.
    pub fn enter(&mut self, stage: &str) {
        if self.current.as_ref().is_some_and(|(s, _)| s == stage) {
            return;
        }
        self.end_current(true);
        self.current = Some((stage.to_string(), std::time::Instant::now()));
        self.display.step(&Step::Enter(stage.to_string()));
    }

    /// Ends the current stage and clears the spinner; `ok` is false after a failure.
    pub fn finish(&mut self, ok: bool) {
        self.end_current(ok);
        let state = if ok {
            OpState::Succeeded
        } else {
            OpState::Failed
        };
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        if self.display.view == View::Plain {
            self.display.step(&Step::Finished { state, elapsed_ms });
        }
        self.display.finish();
    }

    fn end_current(&mut self, ok: bool) {
        if let Some((stage, at)) = self.current.take() {
            let ms = at.elapsed().as_millis() as u64;
            self.display.step(&Step::Done { stage, ms, ok });
        }
    }
}

/// Ctrl-C, observed by every follower. The first Ctrl-C asks each followed operation to
/// cancel; a second one exits at once with status 130.
#[derive(Clone)]
pub struct Interrupt {
    rx: watch::Receiver<bool>,
    task: std::sync::Arc<tokio::task::JoinHandle<()>>,
}

impl Interrupt {
    /// Installs the Ctrl-C handler (from then on Ctrl-C no longer kills the process outright).
    pub fn install() -> Interrupt {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\ninterrupted again: not waiting for the cancellation to finish");
                    std::process::exit(130);
                }
            }
            // Keep the sender alive so receivers never see a closed channel.
            std::future::pending::<()>().await;
        });
        Interrupt {
            rx,
            task: std::sync::Arc::new(task),
        }
    }

    /// Stops watching Ctrl-C (e.g. before running a command that handles signals itself), so a
    /// second Ctrl-C no longer exits the process at once.
    pub fn disarm(&self) {
        self.task.abort();
    }

    /// Whether Ctrl-C was pressed.
    pub fn fired(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Follows `op` until it is terminal and returns it as the daemon last reported it.
pub async fn follow(
    client: &Client,
    op: Operation,
    view: View,
    interrupt: &Interrupt,
) -> Result<Operation> {
    if op.state.is_terminal() {
        return Ok(op);
    }
    let display = Display::new(view, label(&op));
    let mut tracker = StageTracker::default();
    let mut rx = interrupt.rx.clone();
    let mut cancel_requested = false;
    let mut lost_streams = 0;
    loop {
        let mut stream = client.events(&op_path(&op.id, "/events")).await?;
        loop {
            tokio::select! {
                ev = stream.next() => match ev {
                    Ok(Some(ev)) => {
                        for step in tracker.on_event(&ev) {
                            display.step(&step);
                        }
                        if ev.state.is_terminal() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        display.note(&format!("event stream interrupted: {e:#}"));
                        break;
                    }
                },
                // The guard `wait_for` returns is dropped at once: `follow` stays `Send`.
                res = async { rx.wait_for(|fired| *fired).await.map(|_| ()) }, if !cancel_requested => {
                    cancel_requested = true;
                    if res.is_ok() {
                        display.note("cancelling (Ctrl-C again to stop waiting)…");
                        if let Err(e) = client.post_ignore(&op_path(&op.id, "/cancel")).await {
                            display.note(&format!("could not cancel: {e:#}"));
                        }
                    }
                }
            }
        }
        let latest: Operation = client.get(&op_path(&op.id, "")).await?;
        if latest.state.is_terminal() {
            let elapsed = tracker.last_elapsed();
            for step in tracker.finish(latest.state, elapsed) {
                display.step(&step);
            }
            display.finish();
            return Ok(latest);
        }
        lost_streams += 1;
        if lost_streams > 5 {
            display.finish();
            let check = match op.kind {
                OpKind::ImageImport
                | OpKind::ImagePull
                | OpKind::ImageBuild
                | OpKind::ImageCommit => "wick image list".to_string(),
                OpKind::KernelImport | OpKind::KernelPull => "wick kernel list".to_string(),
                _ => format!("wick vm show {}", op.vm_name),
            };
            bail!(
                "lost the event stream of operation {} (still running); check on it with \
                 `{check}`",
                op.id
            );
        }
        tokio::time::sleep(Duration::from_millis(200 * lost_streams)).await;
    }
}

impl StageTracker {
    /// Elapsed time of the latest stage start seen (a lower bound for the operation's duration).
    fn last_elapsed(&self) -> u64 {
        self.current.as_ref().map(|c| c.1).unwrap_or(0)
    }
}

/// A terminal operation as a result: the operation if it succeeded, else its error (carrying
/// the operation id).
pub fn outcome(op: Operation) -> Result<Operation, ApiError> {
    match op.state {
        OpState::Succeeded => Ok(op),
        state => {
            let mut err = op.error.clone().unwrap_or_else(|| match state {
                OpState::Cancelled => ApiError::new(
                    ErrorCode::Cancelled,
                    format!("{} was cancelled", label(&op)),
                ),
                _ => ApiError::new(
                    ErrorCode::Internal,
                    format!("{} failed without an error message", label(&op)),
                ),
            });
            if err.op_id.is_none() {
                err.op_id = Some(op.id.clone());
            }
            Err(err)
        }
    }
}

/// Starts an image or kernel job (`POST path` with `body`), follows its operation with live
/// progress and returns what it made. Ctrl-C cancels the job (the daemon removes what it left)
/// and ends the command with status 130, as for `vm create`.
pub async fn run_artifact_job<B: Serialize>(
    client: &Client,
    path: &str,
    body: &B,
) -> Result<ArtifactOp> {
    let interrupt = Interrupt::install();
    let op: Operation = client.post(path, body).await?;
    if let (true, Some(stage)) = (op.state.is_terminal(), &op.stage) {
        // Over before it was followed (a build's cache hit): say how it ended.
        eprintln!("{}", render::escape(&format!("[{}] {stage}", label(&op))));
    }
    let op = follow(client, op, View::auto(), &interrupt).await?;
    if interrupt.fired() {
        match outcome(op) {
            Ok(op) => eprintln!("interrupted, but {} had already finished", label(&op)),
            Err(e) => eprintln!("error: {}", render::api_error(&e)),
        }
        return Err(Exit(130).into());
    }
    let op = outcome(op)?;
    let name = target(&op).to_string();
    op.artifact.ok_or_else(|| {
        anyhow::anyhow!("wickd reported no result for {name} (is it the same version as wick?)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, state: OpState, stage: Option<&str>, elapsed_ms: u64) -> OpEvent {
        OpEvent {
            op_id: "op1".into(),
            seq,
            state,
            stage: stage.map(Into::into),
            elapsed_ms,
            error: None,
            vm: None,
            artifact: None,
        }
    }

    fn run(events: &[OpEvent]) -> Vec<Step> {
        let mut t = StageTracker::default();
        events.iter().flat_map(|e| t.on_event(e)).collect()
    }

    #[test]
    fn stages_and_durations() {
        let steps = run(&[
            ev(0, OpState::Running, None, 0),
            ev(1, OpState::Running, Some("clone root disk"), 2),
            ev(2, OpState::Running, Some("spawn vmm"), 125),
            ev(3, OpState::Running, Some("spawn vmm"), 130),
            ev(4, OpState::Running, Some("boot"), 200),
            ev(5, OpState::Succeeded, None, 1400),
        ]);
        assert_eq!(
            steps,
            [
                Step::Enter("clone root disk".into()),
                Step::Done {
                    stage: "clone root disk".into(),
                    ms: 123,
                    ok: true
                },
                Step::Enter("spawn vmm".into()),
                Step::Done {
                    stage: "spawn vmm".into(),
                    ms: 75,
                    ok: true
                },
                Step::Enter("boot".into()),
                Step::Done {
                    stage: "boot".into(),
                    ms: 1200,
                    ok: true
                },
                Step::Finished {
                    state: OpState::Succeeded,
                    elapsed_ms: 1400
                },
            ]
        );
        let live: Vec<String> = steps.iter().filter_map(live_line).collect();
        assert_eq!(
            live,
            [
                "✓ clone root disk (123 ms)",
                "✓ spawn vmm (75 ms)",
                "✓ boot (1.2 s)"
            ]
        );
        let plain: Vec<String> = steps
            .iter()
            .filter_map(|s| plain_line("create a1", s))
            .collect();
        assert_eq!(
            plain,
            [
                "[create a1] stage: clone root disk",
                "[create a1] stage: spawn vmm",
                "[create a1] stage: boot",
                "[create a1] succeeded (1.4 s)",
            ]
        );
    }

    #[test]
    fn failure_marks_the_stage() {
        let steps = run(&[
            ev(0, OpState::Running, Some("boot"), 10),
            ev(1, OpState::Failed, Some("boot"), 510),
            ev(2, OpState::Failed, None, 600),
        ]);
        assert_eq!(
            steps,
            [
                Step::Enter("boot".into()),
                Step::Done {
                    stage: "boot".into(),
                    ms: 500,
                    ok: false
                },
                Step::Finished {
                    state: OpState::Failed,
                    elapsed_ms: 510
                },
            ]
        );
        assert_eq!(live_line(&steps[1]).unwrap(), "✗ boot (500 ms)");
        assert_eq!(
            plain_line("stop b2", &steps[2]).unwrap(),
            "[stop b2] failed (510 ms)"
        );
    }

    #[test]
    fn replayed_events_are_ignored() {
        let mut t = StageTracker::default();
        assert_eq!(t.on_event(&ev(0, OpState::Running, Some("a"), 0)).len(), 1);
        assert_eq!(t.on_event(&ev(1, OpState::Running, Some("b"), 5)).len(), 2);
        // Re-subscribed: the stream replays from seq 0.
        assert!(t
            .on_event(&ev(0, OpState::Running, Some("a"), 0))
            .is_empty());
        assert!(t
            .on_event(&ev(1, OpState::Running, Some("b"), 5))
            .is_empty());
        assert_eq!(
            t.on_event(&ev(2, OpState::Cancelled, None, 9)),
            [
                Step::Done {
                    stage: "b".into(),
                    ms: 4,
                    ok: false
                },
                Step::Finished {
                    state: OpState::Cancelled,
                    elapsed_ms: 9
                },
            ]
        );
        assert!(t.finish(OpState::Cancelled, 9).is_empty(), "finishes once");
    }

    fn op(state: OpState, error: Option<ApiError>) -> Operation {
        Operation {
            id: "op9".into(),
            kind: OpKind::Start,
            vm_id: "abc".into(),
            vm_name: "a1".into(),
            state,
            stage: None,
            error,
            vm: None,
            started_at: "2024-05-01T12:00:00Z".into(),
            finished_at: None,
            artifact: None,
        }
    }

    #[test]
    fn outcomes_carry_the_operation_id() {
        assert!(outcome(op(OpState::Succeeded, None)).is_ok());
        let e = outcome(op(
            OpState::Failed,
            Some(ApiError::new(ErrorCode::Internal, "boom")),
        ))
        .unwrap_err();
        assert_eq!(
            (e.message.as_str(), e.op_id.as_deref()),
            ("boom", Some("op9"))
        );
        let e = outcome(op(OpState::Cancelled, None)).unwrap_err();
        assert_eq!(e.code, ErrorCode::Cancelled);
        assert_eq!(e.message, "start a1 was cancelled");
        let mut import = op(OpState::Cancelled, None);
        (import.kind, import.vm_name) = (OpKind::ImageImport, String::new());
        import.artifact = Some(ArtifactOp::named("base"));
        assert_eq!(label(&import), "import image base");
        let e = outcome(import).unwrap_err();
        assert_eq!(e.message, "import image base was cancelled");
    }
}
