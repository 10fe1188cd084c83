//! layer (see DESIGN.md).
