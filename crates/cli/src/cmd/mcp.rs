//! `wick mcp`: a Model Context Protocol server on stdin/stdout, for coding agents.
//!
//! Built on `rmcp`, the official Rust SDK. Every tool is a thin call into what the CLI commands
//! do — the daemon API for VMs, the agent (through wickd) for commands and files — so the
//! caller's uid owns what it creates and sees only its own VMs, exactly as with the CLI. A
//! failure is an MCP error carrying wick's message (and the daemon's error code as `data.code`):
//! `invalid_params` for a request wick refused, `internal_error` for the rest. Tool output never
//! reaches stdout except as protocol messages; progress lines go to stderr.

mod tools;
mod types;

use std::sync::Arc;

use anyhow::Result;
use rmcp::model::{Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ErrorData as McpError, ServiceExt};
use serde_json::json;
use wick_model::api::{ApiError, ErrorCode};

use super::Ctx;

pub use tools::WickMcp;

/// Serves MCP on stdin/stdout until the client closes stdin.
pub async fn run(ctx: Ctx) -> Result<()> {
    let service = WickMcp::new(Arc::new(ctx))
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}

/// The server's self-description.
fn server_info() -> ServerConfig {
    ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        .with_server_info(Implementation::new("wick", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "wick runs commands in disposable microVM sandboxes. create_vm (or run_repository) \
             makes one; exec, read_file, write_file and list_files work inside it; \
             export_workspace returns a repository's changes as a patch; delete_vm removes it.",
        )
}

/// A wick error as an MCP error with wick's message.
fn mcp_error(e: anyhow::Error) -> McpError {
    let message = format!("{e:#}");
    if e.downcast_ref::<BadInput>().is_some() {
        return McpError::invalid_params(message, Some(json!({ "code": "invalid_argument" })));
    }
    match e.downcast_ref::<ApiError>().map(|a| a.code) {
        Some(code) => {
            let data = Some(json!({ "code": code.as_str() }));
            match code {
                ErrorCode::Internal | ErrorCode::Cancelled => {
                    McpError::internal_error(message, data)
                }
                _ => McpError::invalid_params(message, data),
            }
        }
        None => McpError::internal_error(message, None),
    }
}

/// A tool call refused before anything was done (reported as `invalid_params`).
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `Err(BadInput)` with `message`.
macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::cmd::mcp::BadInput(format!($($arg)*))))
    };
}
use refuse;

/// Marks any error of `r` as bad input.
fn bad_input<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::Error::new(BadInput(format!("{e:#}"))))
}
