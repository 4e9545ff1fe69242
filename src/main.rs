//! The `pgnear` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    pgnear::cli::main(pgnear::cli::Cli::parse())
}
