//! ferry: build a monorepo's container images in one command.
//!
//! The library holds every stage of the pipeline (see DESIGN.md section 1); the binary in
//! `main.rs` only parses arguments, calls in here and prints.

pub mod build;
pub mod changes;
pub mod context;
pub mod diagnostic;
pub mod digest;
pub mod dockerfile;
pub mod git;
pub mod graph;
pub mod layer;
pub mod manifest;
pub mod oci;
pub mod permits;
pub mod plan;
pub mod reference;
pub mod registry;
pub mod release;
pub mod report;
pub mod sandbox;
pub mod store;
pub mod userns;
