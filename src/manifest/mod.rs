//! manifest (see DESIGN.md).
