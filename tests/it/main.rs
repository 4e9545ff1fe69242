//! pgnear's integration tests: one binary, real PostgreSQL servers started
//! by `pgnear::lab`, and pgnear itself started in-process on port 0.

#![allow(clippy::unwrap_used)] // tests fail loudly
// Tests run on their own runtimes, with time drivers.
#![allow(clippy::disallowed_methods)]

mod auth;
mod config;
mod consistency;
mod console;
mod demo;
mod fuzz_corpus;
mod hostile;
mod limits;
mod near;
mod observability;
mod optimistic;
mod pooling;
mod relay;
mod reload;
mod retry;
mod routing;
mod schema;
mod staleness;
mod support;
mod tls;
mod topology;
mod unix;
