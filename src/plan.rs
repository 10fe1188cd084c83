//! The build plan.
