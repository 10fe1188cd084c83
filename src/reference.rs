//! Docker image references.
