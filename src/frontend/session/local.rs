//! `SET`, `RESET` and `SHOW` of `pgnear.*` settings: answered by pgnear,
//! never forwarded.

use crate::cluster::Lsn;
use crate::protocol::backend::{command_complete, data_row, error_response, row_description, Severity};
use crate::protocol::{Frame, SqlState};
use crate::router::classify::ProxyCommand;
use crate::router::RouteSetting;

/// The session's `pgnear.*` settings.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub route: RouteSetting,
    /// `pgnear.min_lsn`: reads see nothing older than this.
    pub min_lsn: Option<Lsn>,
}

/// What the session knows that `SHOW` may report.
pub struct Report {
    pub write_lsn: Option<Lsn>,
}

const NAMES: &[&str] = &["route", "min_lsn", "write_lsn"];

impl ProxySettings {
    /// Sets one setting from a startup option or `SET`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), Frame> {
        match name {
            "route" => {
                self.route = match value.to_ascii_lowercase().as_str() {
                    "auto" | "default" => RouteSetting::Auto,
                    "primary" => RouteSetting::Primary,
                    "replica" => RouteSetting::Replica,
                    _ => return Err(invalid(name, value, "expected primary, replica or auto")),
                }
            }
            "min_lsn" => {
                let lsn = value.parse::<Lsn>().map_err(|e| invalid(name, value, &e))?;
                self.min_lsn = Some(lsn);
            }
            "write_lsn" => return Err(error(SqlState::FeatureNotSupported, "pgnear.write_lsn is read-only")),
            _ => return Err(unknown(name)),
        }
        Ok(())
    }

    /// Runs one command; returns the response frames (without ReadyForQuery).
    pub fn execute(&mut self, command: &ProxyCommand, report: &Report) -> Vec<Frame> {
        let result = match command {
            ProxyCommand::Set { name, value } => {
                self.set(name, value).map(|()| vec![command_complete("SET")])
            }
            ProxyCommand::Reset { name } => self.reset(name).map(|()| vec![command_complete("RESET")]),
            ProxyCommand::Show { name } => self.show(name, report),
        };
        result.unwrap_or_else(|error| vec![error])
    }

    fn reset(&mut self, name: &str) -> Result<(), Frame> {
        match name {
            "route" => self.route = RouteSetting::Auto,
            "min_lsn" => self.min_lsn = None,
            "all" => *self = ProxySettings::default(),
            "write_lsn" => return Err(error(SqlState::FeatureNotSupported, "pgnear.write_lsn is read-only")),
            _ => return Err(unknown(name)),
        }
        Ok(())
    }

    fn value(&self, name: &str, report: &Report) -> Option<String> {
        let lsn = |l: Option<Lsn>| l.map(|l| l.to_string()).unwrap_or_default();
        Some(match name {
            "route" => match self.route {
                RouteSetting::Auto => "auto",
                RouteSetting::Primary => "primary",
                RouteSetting::Replica => "replica",
            }
            .to_string(),
            "min_lsn" => lsn(self.min_lsn),
            "write_lsn" => lsn(report.write_lsn),
            _ => return None,
        })
    }

    fn show(&self, name: &str, report: &Report) -> Result<Vec<Frame>, Frame> {
        if name == "all" {
            let mut frames = vec![row_description(&["name", "setting"])];
            for n in NAMES {
                let value = self.value(n, report).unwrap_or_default();
                frames.push(data_row(&[&format!("pgnear.{n}"), &value]));
            }
            frames.push(command_complete("SHOW"));
            return Ok(frames);
        }
        let value = self.value(name, report).ok_or_else(|| unknown(name))?;
        let column = format!("pgnear.{name}");
        Ok(vec![row_description(&[&column]), data_row(&[&value]), command_complete("SHOW")])
    }
}

fn error(code: SqlState, message: &str) -> Frame {
    error_response(Severity::Error, code, message)
}

fn unknown(name: &str) -> Frame {
    error(SqlState::UndefinedObject, &format!("unrecognized configuration parameter \"pgnear.{name}\""))
}

fn invalid(name: &str, value: &str, why: &str) -> Frame {
    error(
        SqlState::InvalidParameterValue,
        &format!("invalid value for parameter \"pgnear.{name}\": \"{value}\": {why}"),
    )
}

/// Takes `-c pgnear.x=y` (and `--pgnear.x=y`) out of a startup `options`
/// value. Returns the remaining options and the pgnear settings found.
pub fn split_options(options: &str) -> (String, Vec<(String, String)>) {
    let mut kept: Vec<&str> = Vec::new();
    let mut found = Vec::new();
    let mut words = options.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            match words.peek() {
                Some(next) if next.starts_with("pgnear.") => words.next(),
                _ => None,
            }
        } else {
            word.strip_prefix("-cpgnear.").or_else(|| word.strip_prefix("--pgnear."))
        };
        match setting.map(|s| s.strip_prefix("pgnear.").unwrap_or(s)).and_then(|s| s.split_once('=')) {
            Some((name, value)) => found.push((name.to_ascii_lowercase(), value.to_string())),
            None if setting.is_some() => {}
            None => kept.push(word),
        }
    }
    (kept.join(" "), found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_lose_only_pgnear_settings() {
        let (rest, found) =
            split_options("-c statement_timeout=5s -c pgnear.min_lsn=0/16B3748 --pgnear.route=primary");
        assert_eq!(rest, "-c statement_timeout=5s");
        assert_eq!(
            found,
            [("min_lsn".to_string(), "0/16B3748".to_string()), ("route".into(), "primary".into())]
        );
        let (rest, found) = split_options("-c DateStyle=ISO");
        assert_eq!((rest.as_str(), found.len()), ("-c DateStyle=ISO", 0));
    }

    #[test]
    fn set_and_show() {
        let mut settings = ProxySettings::default();
        let report = Report { write_lsn: Some(Lsn(0x16_0000_0010)) };
        let set = ProxyCommand::Set { name: "route".into(), value: "primary".into() };
        assert_eq!(settings.execute(&set, &report), vec![command_complete("SET")]);
        assert_eq!(settings.route, RouteSetting::Primary);
        let show = ProxyCommand::Show { name: "write_lsn".into() };
        let frames = settings.execute(&show, &report);
        assert_eq!(frames[1], data_row(&["16/10"]));
        let bad = ProxyCommand::Set { name: "min_lsn".into(), value: "nope".into() };
        assert_eq!(settings.execute(&bad, &report)[0].tag(), b'E');
        let unknown = ProxyCommand::Show { name: "colour".into() };
        assert_eq!(settings.execute(&unknown, &report)[0].tag(), b'E');
    }
}
