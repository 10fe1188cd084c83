//! release (see DESIGN.md).
