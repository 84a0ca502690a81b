//! The error type of the image crate: every variant says what went wrong and what to do.

use std::io;
use std::path::Path;

/// Result alias for this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("image {0:?} not found; `wick image list` shows the images there are")]
    NotFound(String),
    #[error("an image named {0:?} already exists; delete it first or choose another name")]
    Exists(String),
    #[error("refusing archive entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: String },
    #[error("`{tool}` was not found: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error("`{cmd}` failed ({status}):\n{output}")]
    Command {
        cmd: String,
        status: String,
        output: String,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the download or cache is corrupt, try again")]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("OCI registry: {0}")]
    Registry(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> ImageError {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds a context (usually "verb <path>") to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T> {
        self.map_err(|e| ImageError::io(format!("{what} {}", path.display()), e))
    }
}
