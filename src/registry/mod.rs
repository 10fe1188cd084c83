//! registry (see DESIGN.md).
