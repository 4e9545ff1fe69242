//! A lab of real PostgreSQL servers on loopback.
pub mod cluster;
pub mod relay;
