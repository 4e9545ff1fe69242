//! Routing decisions.
pub mod cache;
pub mod classify;
pub mod functions;
