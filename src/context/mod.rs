//! context (see DESIGN.md).
