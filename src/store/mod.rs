//! store (see DESIGN.md).
