//! The agent tests' and benchmark's harness: testkit's ([`wick_testkit::agent`]), running the
//! `wick-agent` binary this package's `cargo test` just built.

#![allow(dead_code)]

use std::path::Path;

pub use wick_testkit::agent::AgentHarness as Harness;

/// Starts this package's `wick-agent` behind the fake muxer, with a connected client.
pub async fn start() -> Harness {
    Harness::start_with(Path::new(env!("CARGO_BIN_EXE_wick-agent"))).await
}
