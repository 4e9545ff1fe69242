//! pgnear: a PostgreSQL wire-protocol proxy (work in progress).
pub mod lab;
pub mod router;
