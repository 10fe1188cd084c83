//! Counters of the costly work this process did: layers decompressed and child processes
//! started. `build --json` reports them as `work`, so a test (or a user wondering why a
//! no-op build is slow) can see that a build whose steps all hit the cache read no layer
//! and started no process per image.
//!
//! They are process-wide: a build is one process, and every place that decompresses a
//! layer or starts a process counts itself here (`layer::decompressing_reader`, the sandbox, git,
//! the id-map helpers, credential helpers).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

static DECOMPRESSIONS: AtomicU64 = AtomicU64::new(0);
static PROCESSES_STARTED: AtomicU64 = AtomicU64::new(0);

/// The counts so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Streams opened for decompression: layers (extracting a snapshot, reading a layer's
    /// entries, checking a diff_id) and ADDed archives.
    pub decompressions: u64,
    /// Child processes started (sandboxes, git, newuidmap, credential helpers).
    pub processes_started: u64,
}

pub fn decompression_started() {
    DECOMPRESSIONS.fetch_add(1, Ordering::Relaxed);
}

pub fn process_started() {
    PROCESSES_STARTED.fetch_add(1, Ordering::Relaxed);
}

pub fn so_far() -> Work {
    Work {
        decompressions: DECOMPRESSIONS.load(Ordering::Relaxed),
        processes_started: PROCESSES_STARTED.load(Ordering::Relaxed),
    }
}
