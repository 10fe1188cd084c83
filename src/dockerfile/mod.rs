//! dockerfile (see DESIGN.md).
