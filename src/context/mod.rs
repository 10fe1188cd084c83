//! The build context and every other tree COPY and ADD read from (see DESIGN.md sections 6, 7).
//!
//! - [`IgnoreFile`] / [`IgnoreMatcher`]: `.dockerignore` with docker's exact semantics.
//! - [`SourceTree`]: a root directory with its ignore rules; [`SourceTree::select`] resolves
//!   COPY/ADD sources (globs, `--exclude`, symlinks kept inside the root) into a [`Selection`].
//! - [`map_to_destination`]: docker's COPY destination rules, giving the [`CopyItem`]s a layer
//!   writer emits.
//! - [`Selection::content_digest`]: the Merkle content hash a COPY step's cache key uses, made
//!   cheap for unchanged trees by a persistent [`StatCache`].

mod dest;
mod glob;
mod hash;
mod ignore;
mod tree;

use std::path::PathBuf;

pub use dest::{map_to_destination, map_to_destination_with, CopyItem, CopyKind};
pub use glob::{clean as clean_path, has_wildcards, BadPattern, Glob};
pub use hash::{CacheStats, StatCache};
pub use ignore::{IgnoreFile, IgnoreMatcher, IgnorePattern};
pub use tree::{Entry, EntryKind, FileStat, SelectedItem, Selection, SourceTree};

/// Everything that can go wrong reading a build context or a stage's tree. Each message names
/// the source operand or pattern and the tree (for the build context: its directory).
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{}:{line}: invalid pattern {pattern:?}: {reason}", file.display())]
    BadIgnorePattern { file: PathBuf, line: usize, pattern: String, reason: String },

    #[error("invalid --exclude pattern {pattern:?}: {reason}")]
    BadExcludePattern { pattern: String, reason: String },

    #[error("invalid source pattern {operand:?} in {tree}: {reason}")]
    BadSourcePattern { operand: String, tree: String, reason: String },

    /// Docker says `failed to compute cache key: "/x": not found`; ignored files are reported
    /// the same way because, as in docker, they are simply not part of the context.
    #[error("failed to compute cache key: {operand:?}: not found in {tree}")]
    NotFound { operand: String, tree: String },

    #[error("source {operand:?} is outside {tree}: {reason}")]
    OutsideRoot { operand: String, tree: String, reason: String },

    #[error("source {operand:?} in {tree}: too many levels of symbolic links")]
    SymlinkLoop { operand: String, tree: String },

    #[error(
        "COPY to {dest:?}: cannot copy a directory onto the file an earlier source wrote \
         there; end the destination with / to copy every source into a directory"
    )]
    DestinationNotDirectory { dest: String },

    #[error("{}: {what} cannot be copied (only files, directories and symlinks)", path.display())]
    UnsupportedFileType { path: PathBuf, what: &'static str },

    #[error("{}: file name is not valid UTF-8", path.display())]
    NonUtf8Name { path: PathBuf },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("writing the stat cache {}: {source}", path.display())]
    CacheWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ContextError> = std::result::Result<T, E>;
