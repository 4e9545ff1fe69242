//! The PostgreSQL server tools: where they are, running them (as `postgres` under root), and
//! turning a failed run into a [`LabError`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use super::{node_name, LabError, PG_BIN_ENV, SUPERUSER};

/// Where the PostgreSQL 15 server tools live unless `PGNEAR_PG_BIN` says otherwise.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The PostgreSQL tool directory and whether tools must run as the `postgres` OS user.
#[derive(Debug, Clone)]
pub(super) struct PgBin {
    dir: PathBuf,
    /// True when we are root, which PostgreSQL refuses to run as.
    as_postgres: bool,
}

// === impl PgBin ===

impl PgBin {
    pub(super) async fn detect() -> Result<PgBin, LabError> {
        let dir =
            std::env::var_os(PG_BIN_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN));
        if !dir.join("initdb").exists() {
            return Err(LabError::MissingTools { dir });
        }
        let mut id = Command::new("id");
        id.arg("-u");
        let uid = run(id).await?;
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        Ok(PgBin { dir, as_postgres })
    }

    /// A command running `tool` from the bin directory (as `postgres` if we are root).
    pub(super) fn command(&self, tool: &str) -> Command {
        let program = self.dir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", SUPERUSER, "--"]).arg(program);
            cmd
        } else {
            Command::new(program)
        };
        // The caller's working directory may be unreadable for `postgres`.
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// Creates the 0755 base directory with one subdirectory per node, owned by `postgres`
    /// when we are root.
    pub(super) async fn base_dir(&self, nodes: usize) -> Result<TempDir, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("pgnear-lab-")
            .tempdir_in(std::env::temp_dir())
            .map_err(LabError::io("creating the lab directory"))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(LabError::io("chmod of the lab directory"))?;
        for i in 0..nodes {
            let path = dir.path().join(node_name(i));
            fs::create_dir(&path).map_err(LabError::io(format!("mkdir {}", path.display())))?;
        }
        if self.as_postgres {
            let owner = format!("{SUPERUSER}:{SUPERUSER}");
            let mut chown = Command::new("chown");
            chown.arg("-R").arg(owner).arg(dir.path());
            run(chown).await?;
        }
        Ok(dir)
    }
}

// === Running tools ===

/// Runs a tool to completion; a non-zero exit is [`LabError::Tool`].
pub(super) async fn run(mut cmd: Command) -> Result<Output, LabError> {
    let command = describe(&cmd);
    // On a blocking thread rather than through tokio's process driver: that
    // driver looks for exited children on every turn of every event loop,
    // a cost the relay would pay for a lab-only feature.
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|joined| std::io::Error::other(joined.to_string()))
        .and_then(|output| output)
        .map_err(LabError::io(format!("running `{command}`")))?;
    checked(command, output)
}

/// [`run`], blocking the thread: for the synchronous `stop` and `kill`.
pub(super) fn run_blocking(mut cmd: Command) -> Result<Output, LabError> {
    let command = describe(&cmd);
    let output = cmd.output().map_err(LabError::io(format!("running `{command}`")))?;
    checked(command, output)
}

fn checked(command: String, output: Output) -> Result<Output, LabError> {
    if output.status.success() {
        return Ok(output);
    }
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stderr), String::from_utf8_lossy(&output.stdout));
    Err(LabError::Tool { command, status: output.status, output: text.trim().to_owned() })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
