//! `SET`, `RESET` and `SHOW` of `pgnear.*` settings: answered by pgnear,
//! never forwarded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::Prepared;
use super::Session;
use crate::cluster::Lsn;
use crate::protocol::backend::{command_complete, data_row, error_response, row_description, Severity};
use crate::protocol::backend::{no_data, parse_complete, ready_for_query};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::{Frame, SqlState};
use crate::router::classify::parse_millis;
use crate::router::classify::ProxyCommand;
use crate::router::classify::{Class, Classification};
use crate::router::{RouteSetting, Staleness};
use crate::tls::Split;

/// The session's `pgnear.*` settings.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub route: RouteSetting,
    /// `pgnear.min_lsn`: reads see nothing older than this.
    pub min_lsn: Option<Lsn>,
    /// `pgnear.report_node`: send ParameterStatus `pgnear.node` whenever
    /// the node that serves the session's statements changes. Off by
    /// default: drivers such as PgJDBC fail on a ParameterStatus they did
    /// not expect.
    pub report_node: bool,
    /// `pgnear.prefer_region`: that region's replicas are this session's
    /// first choice for reads while they are eligible.
    pub prefer_region: Option<String>,
    /// `pgnear.max_staleness_ms` and `pgnear.read_your_writes`: the bound
    /// on the staleness of the session's reads (a hint may override it).
    pub staleness: Staleness,
}

/// What the session knows that `SHOW` may report.
#[derive(Default)]
pub struct Report {
    pub write_lsn: Option<Lsn>,
    /// The node and region that served the session's last statement
    /// (empty before the first).
    pub node: String,
    pub region: String,
    /// The regions of the cluster's nodes, which `prefer_region` must name.
    pub regions: Vec<String>,
}

const NAMES: &[&str] = &[
    "route",
    "min_lsn",
    "report_node",
    "prefer_region",
    "max_staleness_ms",
    "read_your_writes",
    "write_lsn",
    "node",
    "region",
];

/// Settings that only report.
const READ_ONLY: &[&str] = &["write_lsn", "node", "region"];

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
            "report_node" => {
                let on = crate::protocol::parse_bool(value);
                self.report_node = on.ok_or_else(|| invalid(name, value, "expected a boolean"))?;
            }
            "prefer_region" => {
                let region = value.trim();
                self.prefer_region = (!region.is_empty()).then(|| region.to_string());
            }
            "max_staleness_ms" => {
                self.staleness.max = match value.trim() {
                    v if v.eq_ignore_ascii_case("default") => None,
                    v => Some(parse_millis(v).ok_or_else(|| {
                        invalid(name, value, "expected a whole number of milliseconds, 0 or more")
                    })?),
                }
            }
            "read_your_writes" => {
                self.staleness.read_your_writes = match value.trim() {
                    v if v.eq_ignore_ascii_case("default") => true,
                    v => crate::protocol::parse_bool(v)
                        .ok_or_else(|| invalid(name, value, "expected a boolean"))?,
                }
            }
            name if READ_ONLY.contains(&name) => return Err(read_only(name)),
            _ => return Err(unknown(name)),
        }
        Ok(())
    }

    /// Runs one command; returns the response frames (without ReadyForQuery).
    pub fn execute(&mut self, command: &ProxyCommand, report: &Report) -> Vec<Frame> {
        let result = match command {
            ProxyCommand::Set { name, value } => Self::known_region(name, value, &report.regions)
                .and_then(|()| self.set(name, value))
                .map(|()| vec![command_complete("SET")]),
            ProxyCommand::Reset { name } => self.reset(name).map(|()| vec![command_complete("RESET")]),
            ProxyCommand::Show { name } => self.show(name, report),
        };
        result.unwrap_or_else(|error| vec![error])
    }

    /// A `prefer_region` must be one of the cluster's (`regions`).
    pub fn known_region(name: &str, value: &str, regions: &[String]) -> Result<(), Frame> {
        let region = value.trim();
        if name != "prefer_region" || region.is_empty() || regions.iter().any(|r| r == region) {
            return Ok(());
        }
        Err(invalid(name, value, &format!("no node is in that region (known: {})", regions.join(", "))))
    }

    fn reset(&mut self, name: &str) -> Result<(), Frame> {
        match name {
            "route" => self.route = RouteSetting::Auto,
            "min_lsn" => self.min_lsn = None,
            "report_node" => self.report_node = false,
            "prefer_region" => self.prefer_region = None,
            "max_staleness_ms" => self.staleness.max = None,
            "read_your_writes" => self.staleness.read_your_writes = true,
            "all" => *self = ProxySettings::default(),
            name if READ_ONLY.contains(&name) => return Err(read_only(name)),
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
            "report_node" => (if self.report_node { "on" } else { "off" }).to_string(),
            "prefer_region" => self.prefer_region.clone().unwrap_or_default(),
            "max_staleness_ms" => self.staleness.max.map(|m| m.as_millis().to_string()).unwrap_or_default(),
            "read_your_writes" => (if self.staleness.read_your_writes { "on" } else { "off" }).to_string(),
            "write_lsn" => lsn(report.write_lsn),
            "node" => report.node.clone(),
            "region" => report.region.clone(),
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

fn read_only(name: &str) -> Frame {
    error(SqlState::FeatureNotSupported, &format!("pgnear.{name} is read-only"))
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

/// A ParameterStatus saying new transactions are read-only by default.
pub(super) fn is_read_only_default(frame: &Frame) -> bool {
    crate::protocol::backend::parse_parameter_status(frame)
        .is_ok_and(|(name, value)| name == "default_transaction_read_only" && value == b"on")
}

/// The regions of `cluster`'s nodes, sorted, each once.
pub(super) fn regions(shared: &crate::frontend::Shared, cluster: &str) -> Vec<String> {
    let nodes = shared.topology.live().map(|(_, n)| n).filter(|n| n.config.cluster == cluster);
    let mut regions: Vec<String> = nodes.map(|n| n.config.region.clone()).collect();
    regions.sort();
    regions.dedup();
    regions
}

/// Whether the startup parameters (a parameter of its own, or `-c` in
/// `options`) make `default_transaction_isolation` serializable.
pub fn serializable_at_startup(params: &[(String, String)]) -> bool {
    const NAME: &str = "default_transaction_isolation";
    let serializable = |value: &str| value.trim_matches(['\'', '"']).eq_ignore_ascii_case("serializable");
    params.iter().any(|(name, value)| match name.as_str() {
        NAME => serializable(value),
        "options" => {
            let mut words = value.split_whitespace().peekable();
            let mut found = false;
            while let Some(word) = words.next() {
                let setting = match word {
                    "-c" => words.next(),
                    _ => word.strip_prefix("-c").or_else(|| word.strip_prefix("--")),
                };
                if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
                    if name.eq_ignore_ascii_case(NAME) {
                        found = serializable(value);
                    }
                }
            }
            found
        }
        _ => false,
    })
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Waits (a few monitor intervals at most) for a pending watermark to
    /// resolve, so that `SHOW pgnear.write_lsn` reports the last write.
    pub(super) async fn await_watermark(&mut self) {
        if !self.writes.watermark.is_pending() {
            return;
        }
        let deadline =
            Instant::now() + self.shared.config().monitor.interval * 4 + Duration::from_millis(100);
        while self.writes.watermark.is_pending() && Instant::now() < deadline {
            self.refresh_watermark();
            crate::clock::sleep(super::drive::REPLICA_WAIT_STEP).await;
        }
    }

    /// Answers a simple Query of a `pgnear.*` command.
    pub(super) fn answer_local_query(&mut self, command: &ProxyCommand) {
        self.refresh_watermark();
        let report = self.report();
        let reporting = self.known.settings.report_node;
        for response in self.known.settings.execute(command, &report) {
            self.client.queue(&response);
        }
        self.report_node_if_turned_on(reporting);
        let status = self.bound_status();
        self.client.queue(&ready_for_query(status));
    }

    /// What `SHOW` may report now.
    fn report(&self) -> Report {
        let node = self.known.last_node.map(|n| &self.shared.topology.node(n).config);
        Report {
            write_lsn: self.writes.watermark.lsn(),
            node: node.map(|c| c.name.clone()).unwrap_or_default(),
            region: node.map(|c| c.region.clone()).unwrap_or_default(),
            regions: self.regions(),
        }
    }

    /// The regions of the session's cluster.
    pub(super) fn regions(&self) -> Vec<String> {
        regions(&self.shared, &self.scope.cluster)
    }

    /// A statement was sent to `node`: a session that asked is told when
    /// that is another node than last time.
    pub(super) fn served_by(&mut self, node: usize) {
        if self.known.last_node.replace(node) != Some(node) && self.known.settings.report_node {
            self.report_node();
        }
    }

    /// `pgnear.report_node` was just turned on: the session learns where
    /// it is now, as a server reports a setting of its own.
    fn report_node_if_turned_on(&mut self, was_on: bool) {
        if !was_on && self.known.settings.report_node && self.known.last_node.is_some() {
            self.report_node();
        }
    }

    fn report_node(&mut self) {
        let Some(node) = self.known.last_node else { return };
        let name = &self.shared.topology.node(node).config.name;
        self.client.queue(&crate::protocol::backend::parameter_status("pgnear.node", name));
    }

    /// Answers an extended-protocol batch that runs a `pgnear.*` command
    /// (JDBC and others send even SET this way) as a server would.
    pub(super) fn answer_local_batch(&mut self, frames: &[Frame], classes: &[Arc<Classification>]) {
        let command = classes.iter().find_map(|c| match &c.class {
            Class::ProxyLocal(command) => Some(command.clone()),
            _ => None,
        });
        let mixed = classes.iter().any(|c| !matches!(c.class, Class::ProxyLocal(_)));
        let report = self.report();
        let reporting = self.known.settings.report_node;
        let mut failed = false;
        for frame in frames {
            if failed {
                break;
            }
            let (Some(command), false) = (&command, mixed) else {
                let message = "pgnear.* commands must be sent on their own, not with other statements";
                self.client.queue(&error_response(Severity::Error, SqlState::FeatureNotSupported, message));
                break;
            };
            let show = matches!(command, ProxyCommand::Show { .. });
            match frame.tag() {
                b'P' => {
                    if let Some(parse) = frontend::parse(frame).ok().filter(|p| !p.name.is_empty()) {
                        // Later Binds of this name are answered here too.
                        let class = self.shared.classifier.classify(parse.query);
                        let prepared = Prepared { parse: frame.detached(), class };
                        self.state.prepared.insert(parse.name.to_string(), prepared);
                    }
                    self.client.queue(&parse_complete());
                }
                b'B' => self.client.queue(&Frame::new(b'2', &[])),
                b'C' => self.client.queue(&Frame::new(b'3', &[])),
                b'D' if matches!(frontend::target(frame), Ok(Named::Statement(_))) && !show => {
                    self.client.queue(&Frame::new(b't', &0i16.to_be_bytes()));
                    self.client.queue(&no_data());
                }
                b'D' if show => {
                    if matches!(frontend::target(frame), Ok(Named::Statement(_))) {
                        self.client.queue(&Frame::new(b't', &0i16.to_be_bytes()));
                    }
                    let responses = self.known.settings.execute(command, &report);
                    if let Some(description) = responses.iter().find(|f| f.tag() == b'T') {
                        self.client.queue(description);
                    }
                }
                b'D' => self.client.queue(&no_data()),
                b'E' => {
                    for response in self.known.settings.execute(command, &report) {
                        failed |= response.tag() == b'E';
                        if response.tag() != b'T' {
                            self.client.queue(&response);
                        }
                    }
                }
                _ => {}
            }
        }
        self.report_node_if_turned_on(reporting);
        let status = self.bound_status();
        self.client.queue(&ready_for_query(status));
    }
}

/// Splits `pgnear.*` settings out of the startup `options`; the rest of
/// the startup parameters go to every server the session uses.
pub(super) fn startup_settings(
    login: &crate::frontend::handshake::Login,
) -> Result<(ProxySettings, Vec<(String, String)>), Frame> {
    let mut settings = ProxySettings::default();
    let mut params = Vec::with_capacity(login.params.len() + 1);
    for (name, value) in &login.params {
        if name == "options" {
            let (rest, found) = split_options(value);
            for (name, value) in found {
                settings.set(&name, &value)?;
            }
            if !rest.is_empty() {
                params.push((name.clone(), rest));
            }
        } else if let Some(setting) = name.strip_prefix("pgnear.") {
            settings.set(setting, value)?;
        } else {
            params.push((name.clone(), value.clone()));
        }
    }
    if login.param("database").is_none() {
        params.push(("database".into(), login.user.name.clone()));
    }
    Ok((settings, params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializable_by_default_from_the_startup_parameters() {
        let params = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        let yes = [
            params(&[("default_transaction_isolation", "SERIALIZABLE")]),
            params(&[("options", "-c default_transaction_isolation=serializable")]),
            params(&[("options", "-cdefault_transaction_isolation=serializable -c work_mem=4MB")]),
            params(&[("options", "--default_transaction_isolation=serializable")]),
        ];
        for p in &yes {
            assert!(serializable_at_startup(p), "{p:?}");
        }
        let no = [
            params(&[("default_transaction_isolation", "repeatable read")]),
            params(&[("options", "-c default_transaction_isolation=serializable -c default_transaction_isolation=read_committed")]),
            params(&[("options", "-c search_path=serializable")]),
            params(&[("application_name", "serializable")]),
        ];
        for p in &no {
            assert!(!serializable_at_startup(p), "{p:?}");
        }
    }

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
    fn a_staleness_bound_is_set_shown_and_reset() {
        let mut settings = ProxySettings::default();
        let report = Report::default();
        let run = |settings: &mut ProxySettings, command: ProxyCommand| settings.execute(&command, &report);
        let set = |name: &str, value: &str| ProxyCommand::Set { name: name.into(), value: value.into() };
        let show = |name: &str| ProxyCommand::Show { name: name.into() };
        assert_eq!(run(&mut settings, show("max_staleness_ms"))[1], data_row(&[""]));
        assert_eq!(run(&mut settings, show("read_your_writes"))[1], data_row(&["on"]));
        assert_eq!(run(&mut settings, set("max_staleness_ms", "5000")), vec![command_complete("SET")]);
        assert_eq!(settings.staleness.max, Some(Duration::from_millis(5000)));
        assert_eq!(run(&mut settings, show("max_staleness_ms"))[1], data_row(&["5000"]));
        for bad in ["-1", "five", "1.5", "", "5s", "99999999999999999999999"] {
            let frames = run(&mut settings, set("max_staleness_ms", bad));
            let fields = crate::protocol::backend::ErrorFields::parse(&frames[0]).expect("an error");
            assert_eq!(fields.code, "22023", "{bad:?}");
        }
        assert_eq!(settings.staleness.max, Some(Duration::from_millis(5000)), "a bad value changes nothing");
        assert_eq!(run(&mut settings, set("read_your_writes", "off")), vec![command_complete("SET")]);
        assert!(!settings.staleness.read_your_writes);
        assert_eq!(run(&mut settings, set("read_your_writes", "sometimes"))[0].tag(), b'E');
        assert_eq!(run(&mut settings, show("read_your_writes"))[1], data_row(&["off"]));
        let reset = |name: &str| ProxyCommand::Reset { name: name.into() };
        assert_eq!(run(&mut settings, reset("max_staleness_ms")), vec![command_complete("RESET")]);
        assert_eq!(settings.staleness, Staleness { max: None, read_your_writes: false });
        run(&mut settings, set("max_staleness_ms", "0"));
        assert_eq!(settings.staleness.max, Some(Duration::ZERO));
        run(&mut settings, set("max_staleness_ms", "default"));
        assert_eq!(settings.staleness.max, None);
        run(&mut settings, reset("all"));
        assert_eq!(settings.staleness, Staleness::DEFAULT);
        // From the startup options too.
        let (_, found) = split_options("-c pgnear.max_staleness_ms=250 -c pgnear.read_your_writes=off");
        for (name, value) in found {
            settings.set(&name, &value).expect("a valid setting");
        }
        assert_eq!(
            settings.staleness,
            Staleness { max: Some(Duration::from_millis(250)), read_your_writes: false }
        );
    }

    #[test]
    fn set_and_show() {
        let mut settings = ProxySettings::default();
        let report = Report { write_lsn: Some(Lsn(0x16_0000_0010)), ..Report::default() };
        let set = ProxyCommand::Set { name: "route".into(), value: "primary".into() };
        assert_eq!(settings.execute(&set, &report), vec![command_complete("SET")]);
        assert_eq!(settings.route, RouteSetting::Primary);
        let show = ProxyCommand::Show { name: "write_lsn".into() };
        let frames = settings.execute(&show, &report);
        assert_eq!(frames[1], data_row(&["16/10"]));
        let bad = ProxyCommand::Set { name: "min_lsn".into(), value: "nope".into() };
        assert_eq!(settings.execute(&bad, &report)[0].tag(), b'E');
        let on = ProxyCommand::Set { name: "report_node".into(), value: "on".into() };
        assert_eq!(settings.execute(&on, &report), vec![command_complete("SET")]);
        assert!(settings.report_node);
        let show = ProxyCommand::Show { name: "report_node".into() };
        assert_eq!(settings.execute(&show, &report)[1], data_row(&["on"]));
        for name in ["node", "region", "write_lsn"] {
            let set = ProxyCommand::Set { name: name.into(), value: "x".into() };
            assert_eq!(settings.execute(&set, &report)[0].tag(), b'E', "{name} is read-only");
        }
        let maybe = ProxyCommand::Set { name: "report_node".into(), value: "maybe".into() };
        assert_eq!(settings.execute(&maybe, &report)[0].tag(), b'E');
        let reset = ProxyCommand::Reset { name: "report_node".into() };
        assert_eq!(settings.execute(&reset, &report), vec![command_complete("RESET")]);
        assert!(!settings.report_node);
        let report = Report { node: "eu-1".into(), region: "eu-west".into(), ..Report::default() };
        let show = ProxyCommand::Show { name: "region".into() };
        assert_eq!(settings.execute(&show, &report)[1], data_row(&["eu-west"]));
        let unknown = ProxyCommand::Show { name: "colour".into() };
        assert_eq!(settings.execute(&unknown, &report)[0].tag(), b'E');
    }
}
