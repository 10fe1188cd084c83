//! Releases: environments, tag templates, the semver policy, push and promotion plans.

pub mod promote;
pub mod template;
