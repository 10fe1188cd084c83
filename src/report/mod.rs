//! What a command reports about its own work, beyond its results.

pub mod work;
