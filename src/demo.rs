//! `pgnear demo`: a local primary and replicas with pgnear in front.

use std::process::ExitCode;

/// Runs the demo until Ctrl-C.
pub async fn run(_port: u16) -> ExitCode {
    eprintln!("pgnear demo: not built yet");
    ExitCode::FAILURE
}
