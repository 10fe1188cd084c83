//! build (see DESIGN.md).
