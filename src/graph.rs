//! The fleet DAG.
