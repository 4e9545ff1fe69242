//! PostgreSQL protocol 3.0: bytes to messages and back, nothing more.
//!
//! Frames that routing does not inspect stay opaque [`Frame`]s and are
//! relayed as they arrived. `frontend` reads what clients send, `backend`
//! writes what pgnear itself answers and reads the few server messages the
//! session must understand.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

pub use frame::{Frame, FrameReader, ProtocolError};
pub use sqlstate::SqlState;
