//! The build engine: the scheduler runs images in dependency order over the shared store;
//! the stage executor runs each Dockerfile instruction with cache keys as BuildKit derives
//! them.

pub mod key;
pub mod scheduler;
