//! The build engine: the scheduler runs images in dependency order over the shared store;
//! the stage executor runs each Dockerfile instruction with cache keys as BuildKit derives
//! them (DESIGN.md sections 6–8).

pub mod accounts;
pub mod bases;
pub mod cache;
pub mod cache_mount;
pub mod cache_prune;
pub mod config;
pub mod download;
pub mod executor;
pub mod fleet;
pub mod history;
pub mod key;
pub mod merged;
pub mod output;
pub mod rootfs;
pub mod scheduler;
pub mod scratch;
pub mod shared_cache;

use std::collections::BTreeMap;

pub use fleet::{build_fleet, BuildReport, FleetEvent, ImageReport, ImageStatus};

/// How a build runs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Images built at once.
    pub jobs: usize,
    pub no_cache: bool,
    /// A failed image fails only its descendants.
    pub keep_going: bool,
    /// mtimes in layers (clamped to SOURCE_DATE_EPOCH, or kept) and `created` in configs
    /// and history (the epoch, or the build's start).
    pub source_date_epoch: crate::layer::Epoch,
    pub compression: crate::layer::LayerCompression,
    /// `os/arch`.
    pub platform: String,
    /// `--arg` values, over images.toml args.
    pub build_args: BTreeMap<String, String>,
    /// `--secret` values by id; never logged, never in a layer or key.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// External bases by the reference the Dockerfiles use, pinned before the build.
    pub bases: BTreeMap<String, crate::oci::Descriptor>,
}
