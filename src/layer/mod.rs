//! Layers (DESIGN.md section 7): deterministic tar writing, whiteouts, compression and
//! streaming digests, safe extraction, and the extracted snapshots RUN mounts as lower dirs.
//!
//! - [`write_tar`] / [`pack_entries`]: a list of [`LayerEntry`] (COPY/ADD) to a tar / a blob.
//! - [`pack_directory`]: a RUN step's overlayfs upper dir to a blob, whiteouts converted.
//! - [`LayerSink`]: tar → diffID → zstd/gzip → blob digest → any `Write`, in one pass;
//!   [`recompress`] derives another compression of a stored blob.
//! - [`decompress`] / [`detect_compression`]: read pulled layers and `ADD x.tar.*`.
//! - [`extract_layer`]: apply a tar onto a directory, refusing anything that would write
//!   outside it; [`ensure_snapshot`]: extract a layer once, atomically, for overlay mounts.

mod compress;
mod entry;
mod extract;
mod format;
mod pack_dir;
mod path;
mod reader;
mod sink;
mod snapshot;
mod writer;

use std::io;
use std::path::PathBuf;

pub use compress::{
    decompress, decompressing_reader, detect_compression, Compression, Decompressor,
    LayerCompression, Peeked, MAGIC_LEN, MEDIA_TYPE_DOCKER_LAYER, MEDIA_TYPE_TAR,
    MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD,
};
pub use entry::{EntryKind, LayerEntry};
pub use extract::{extract_layer, ExtractMode, ExtractStats};
pub use pack_dir::{directory_entries, pack_directory, IdMapping, OverlayXattrs, UpperDirOptions};
pub use reader::looks_like_tar;
pub use sink::{pack_entries, recompress, LayerOptions, LayerSink, PackedLayer};
pub use snapshot::{ensure_snapshot, prune_snapshots, snapshot_id};
pub use writer::{write_tar, Epoch};

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry `{path}` {reason}")]
    Entry { path: String, reason: String },

    #[error("cannot read `{}`: {source}", path.display())]
    HostFile { path: PathBuf, source: io::Error },

    #[error("`{}` changed while it was being packed into a layer; run the build again", path.display())]
    HostFileChanged { path: PathBuf },

    #[error("`{path}`: {what}")]
    Unsupported { path: String, what: String },

    #[error("cannot write the layer: {0}")]
    Write(#[source] io::Error),

    #[error("cannot read the layer: {0}")]
    Read(#[source] io::Error),

    /// `entry` is the entry being read, or the last one read before the damage.
    #[error("corrupt tar archive at byte {offset}{}: {reason}", where_in(.entry, *.in_entry))]
    CorruptTar { offset: u64, entry: Option<String>, in_entry: bool, reason: String },

    #[error("refusing tar entry `{entry}`: {reason}")]
    Hostile { entry: String, reason: String },

    #[error("cannot extract `{entry}` into `{}`: {source}", dest.display())]
    Extract { entry: String, dest: PathBuf, source: io::Error },

    #[error("the layer's content has diffID {actual}, expected {expected}")]
    DiffIdMismatch { expected: Digest, actual: Digest },

    #[error("overlay upper dir `{}`: {reason}", path.display())]
    UpperDir { path: PathBuf, reason: String },

    #[error("snapshot `{id}`: {reason}")]
    Snapshot { id: String, reason: String },

    #[error("snapshot `{id}`: {context}: {source}")]
    SnapshotIo { id: String, context: String, source: io::Error },
}

fn where_in(entry: &Option<String>, in_entry: bool) -> String {
    match (entry, in_entry) {
        (Some(name), true) => format!(" in entry `{name}`"),
        (Some(name), false) => format!(" after entry `{name}`"),
        (None, _) => String::new(),
    }
}
