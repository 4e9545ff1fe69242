//! A lab of real PostgreSQL servers on loopback.

// The lab runs on the caller's runtime (a test's or the demo's), which has
// a time driver; it never runs on a session loop.
#![allow(clippy::disallowed_methods)]

pub mod cluster;
pub mod relay;
