//! The build engine: the scheduler runs images in dependency order over the shared store;
//! the stage executor runs each Dockerfile instruction with cache keys as BuildKit derives
//! them (DESIGN.md sections 6–8).

pub mod cache;
pub mod config;
pub mod key;
pub mod rootfs;
pub mod scheduler;
