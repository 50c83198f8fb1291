//! Monit's status document (`GET /_status2?format=xml`) and what the agent derives from it.
//!
//! Parsing is pure: bytes in, [`MonitStatus`] or [`StatusParseError`] out, so it is tested on
//! fixtures captured from real monit.

use serde::{Deserialize, Serialize};

/// The monit group whose services are the VM's jobs.
pub const VCAP_GROUP: &str = "vcap";

/// The whole status document: monit's identity and every service with its group membership.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitStatus {
    /// `<monit id=..>`.
    pub id: String,
    /// `<monit incarnation=..>`: the time monit (re)started; changes on every reload.
    pub incarnation: String,
    /// `<monit version=..>`.
    pub version: String,
    /// `<services><service>`, in document order.
    pub services: Vec<ServiceStatus>,
    /// `<servicegroups><servicegroup>`, in document order.
    pub service_groups: Vec<ServiceGroup>,
}

/// One `<service>` element, the fields upstream reads. Missing elements read as zero/empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceStatus {
    /// `name` attribute.
    pub name: String,
    /// `<status>`: a bit set of failed checks; 0 means all checks pass.
    pub status: i64,
    /// `<status_message>` (older monit only).
    pub status_message: String,
    /// `<monitor>`: 0 not monitored, 1 monitored, 2 initialising (starting).
    pub monitor: i64,
    /// `<pendingaction>`: non-zero while an action (start/stop/…) is queued.
    pub pending_action: i64,
    /// `<uptime>` in seconds.
    pub uptime: i64,
    /// `<children>`.
    pub children: i64,
    /// `<memory>`.
    pub memory: MemoryStatus,
    /// `<cpu>`.
    pub cpu: CpuStatus,
}

/// `<memory>` of a process service.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryStatus {
    /// `<percent>`.
    pub percent: f64,
    /// `<percenttotal>` (with children).
    pub percent_total: f64,
    /// `<kilobyte>`.
    pub kilobyte: i64,
    /// `<kilobytetotal>` (with children).
    pub kilobyte_total: i64,
}

/// `<cpu>` of a process service.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuStatus {
    /// `<percent>`.
    pub percent: f64,
    /// `<percenttotal>` (with children).
    pub percent_total: f64,
}

/// One `<servicegroup name=..>` with the names of its services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceGroup {
    /// `name` attribute.
    pub name: String,
    /// `<service>` texts.
    pub services: Vec<String>,
}

/// A service's state as upstream's `StatusString()` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// `monitor == 0`.
    Unknown,
    /// `monitor == 2`.
    Starting,
    /// Monitored and `status == 0`.
    Running,
    /// Monitored and some check failed.
    Failing,
}

impl ProcessState {
    /// The lowercase word used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Failing => "failing",
        }
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service of a group, as upstream's `monit.Service`.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// `monitor > 0`.
    pub monitored: bool,
    /// `status > 0 && status_message != ""`.
    pub errored: bool,
    /// `pendingaction > 0`.
    pub pending: bool,
    /// See [`ProcessState`].
    pub status: ProcessState,
    /// `<status_message>`.
    pub status_message: String,
    /// Seconds.
    pub uptime: i64,
    /// `memory.percenttotal`.
    pub memory_percent_total: f64,
    /// `memory.kilobytetotal`.
    pub memory_kilobytes_total: i64,
    /// `cpu.percenttotal`.
    pub cpu_percent_total: f64,
}

impl ServiceStatus {
    /// Upstream's `StatusString()`: checked in the order monitor==0, monitor==2, status==0.
    pub fn state(&self) -> ProcessState {
        match (self.monitor, self.status) {
            (0, _) => ProcessState::Unknown,
            (2, _) => ProcessState::Starting,
            (_, 0) => ProcessState::Running,
            _ => ProcessState::Failing,
        }
    }
}

impl MonitStatus {
    /// The services that belong to `group`, in the order of `<services>`; empty when the group
    /// does not exist.
    pub fn services_in_group(&self, group: &str) -> Vec<Service> {
        let Some(members) = self.service_groups.iter().find(|g| g.name == group) else {
            return Vec::new();
        };
        self.services
            .iter()
            .filter(|s| members.services.contains(&s.name))
            .map(|s| Service {
                name: s.name.clone(),
                monitored: s.monitor > 0,
                errored: s.status > 0 && !s.status_message.is_empty(),
                pending: s.pending_action > 0,
                status: s.state(),
                status_message: s.status_message.clone(),
                uptime: s.uptime,
                memory_percent_total: s.memory.percent_total,
                memory_kilobytes_total: s.memory.kilobyte_total,
                cpu_percent_total: s.cpu.percent_total,
            })
            .collect()
    }

    /// The names listed in `group`, as monit lists them (upstream's `ServicesInGroup` on the
    /// client, used by start/stop/unmonitor); empty when the group does not exist.
    pub fn group_members(&self, group: &str) -> Vec<String> {
        self.service_groups
            .iter()
            .find(|g| g.name == group)
            .map(|g| g.services.clone())
            .unwrap_or_default()
    }

    /// The incarnation as a number (it changes when monit reloads).
    pub fn incarnation_number(&self) -> Result<i64, StatusParseError> {
        self.incarnation
            .trim()
            .parse()
            .map_err(|_| StatusParseError::BadNumber {
                service: "monit".to_string(),
                field: "incarnation".to_string(),
                value: self.incarnation.clone(),
            })
    }
}

/// Why a status document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusParseError {
    /// Not well-formed XML.
    #[error("Unmarshalling Monit status: {0}")]
    Xml(String),
    /// Well-formed, but the root element is not `<monit>`.
    #[error("Unmarshalling Monit status: root element is <{0}>, expected <monit>")]
    NotMonit(String),
    /// A numeric field holds something that is not a number.
    #[error(
        "Unmarshalling Monit status: service {service:?} field {field} is {value:?}, not a number"
    )]
    BadNumber {
        /// The service (or `monit` for the root).
        service: String,
        /// The element path, such as `memory/kilobytetotal`.
        field: String,
        /// The text found.
        value: String,
    },
}

/// Decodes monit's bytes: it declares `ISO-8859-1`, where each byte is the code point of the
/// same value; anything else is taken as UTF-8 with invalid bytes replaced.
fn decode(bytes: &[u8]) -> String {
    let prolog_end = bytes.iter().position(|&b| b == b'>').unwrap_or(0);
    let prolog = String::from_utf8_lossy(&bytes[..prolog_end]).to_ascii_lowercase();
    if prolog.starts_with("<?xml") && (prolog.contains("iso-8859-1") || prolog.contains("latin1")) {
        bytes.iter().map(|&b| char::from(b)).collect()
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Parses a `/_status2?format=xml` document. Unknown elements are ignored; missing ones read as
/// zero or empty, as Go's `encoding/xml` does. Never panics on input.
pub fn parse_status(bytes: &[u8]) -> Result<MonitStatus, StatusParseError> {
    let decoded = decode(bytes);
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&decoded, options)
        .map_err(|e| StatusParseError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "monit" {
        return Err(StatusParseError::NotMonit(
            root.tag_name().name().to_string(),
        ));
    }
    let attr = |name: &str| root.attribute(name).unwrap_or_default().to_string();
    let mut status = MonitStatus {
        id: attr("id"),
        incarnation: attr("incarnation"),
        version: attr("version"),
        ..MonitStatus::default()
    };
    for section in root.children().filter(|n| n.is_element()) {
        match section.tag_name().name() {
            "services" => {
                for node in elements(section, "service") {
                    status.services.push(parse_service(node)?);
                }
            }
            "servicegroups" => {
                for node in elements(section, "servicegroup") {
                    status.service_groups.push(ServiceGroup {
                        name: node.attribute("name").unwrap_or_default().to_string(),
                        services: elements(node, "service").map(text).collect(),
                    });
                }
            }
            _ => {}
        }
    }
    Ok(status)
}

fn elements<'a, 'input: 'a>(
    parent: roxmltree::Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'input>> + 'a {
    parent
        .children()
        .filter(move |n| n.is_element() && n.tag_name().name() == name)
}

fn text(node: roxmltree::Node<'_, '_>) -> String {
    node.children()
        .filter_map(|c| c.text())
        .collect::<String>()
        .trim()
        .to_string()
}

/// The trimmed text of the first child element `path` (`a/b` for nested), if present.
fn child_text(node: roxmltree::Node<'_, '_>, path: &str) -> Option<String> {
    let mut current = node;
    for part in path.split('/') {
        current = elements(current, part).next()?;
    }
    Some(text(current))
}

fn parse_service(node: roxmltree::Node<'_, '_>) -> Result<ServiceStatus, StatusParseError> {
    let name = node.attribute("name").unwrap_or_default().to_string();
    let int = |field: &str| -> Result<i64, StatusParseError> {
        match child_text(node, field) {
            None => Ok(0),
            Some(t) if t.is_empty() => Ok(0),
            Some(t) => t.parse().map_err(|_| StatusParseError::BadNumber {
                service: name.clone(),
                field: field.to_string(),
                value: t,
            }),
        }
    };
    let float = |field: &str| -> Result<f64, StatusParseError> {
        match child_text(node, field) {
            None => Ok(0.0),
            Some(t) if t.is_empty() => Ok(0.0),
            Some(t) => t
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| StatusParseError::BadNumber {
                    service: name.clone(),
                    field: field.to_string(),
                    value: t,
                }),
        }
    };
    Ok(ServiceStatus {
        status: int("status")?,
        status_message: child_text(node, "status_message").unwrap_or_default(),
        monitor: int("monitor")?,
        pending_action: int("pendingaction")?,
        uptime: int("uptime")?,
        children: int("children")?,
        memory: MemoryStatus {
            percent: float("memory/percent")?,
            percent_total: float("memory/percenttotal")?,
            kilobyte: int("memory/kilobyte")?,
            kilobyte_total: int("memory/kilobytetotal")?,
        },
        cpu: CpuStatus {
            percent: float("cpu/percent")?,
            percent_total: float("cpu/percenttotal")?,
        },
        name,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Captured from monit 5.33.0 (Debian) with a running `sample` and a passive `failer`.
    const REAL: &[u8] = include_bytes!("../tests/fixtures/monit-5.33-status.xml");

    #[test]
    fn parses_real_monit_output() {
        let status = parse_status(REAL).unwrap();
        assert_eq!(status.version, "5.33.0");
        assert!(status.incarnation_number().unwrap() > 0);
        let names: Vec<_> = status.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sample", "failer", "vm"]);
        let sample = &status.services[0];
        assert_eq!(sample.status, 0);
        assert_eq!(sample.monitor, 1);
        assert_eq!(sample.pending_action, 0);
        assert_eq!(sample.uptime, 172);
        assert_eq!(sample.children, 0);
        assert_eq!(sample.memory.kilobyte, 1424);
        assert_eq!(sample.memory.kilobyte_total, 1424);
        assert_eq!(sample.memory.percent_total, 0.0);
        assert_eq!(sample.cpu.percent_total, 0.0);
        assert_eq!(sample.state(), ProcessState::Running);
        let failer = &status.services[1];
        assert_eq!(failer.status, 4608);
        assert_eq!(failer.state(), ProcessState::Failing);
        assert_eq!(
            status.service_groups,
            vec![ServiceGroup {
                name: "vcap".into(),
                services: vec!["sample".into(), "failer".into()],
            }]
        );
        let vcap = status.services_in_group(VCAP_GROUP);
        assert_eq!(vcap.len(), 2);
        assert_eq!(vcap[0].memory_kilobytes_total, 1424);
        assert!(vcap[0].monitored && !vcap[0].pending && !vcap[0].errored);
        assert_eq!(vcap[1].status, ProcessState::Failing);
        assert_eq!(status.group_members("vcap"), ["sample", "failer"]);
        assert!(status.services_in_group("nope").is_empty());
        assert!(status.group_members("nope").is_empty());
    }

    /// The shape of upstream's test asset (older monit: `status_message`, UTF-8, floats).
    #[test]
    fn parses_upstream_style_document() {
        let xml = br#"<?xml version="1.0" encoding="UTF-8"?>
<monit id="abc" incarnation="1397596592" version="5.2.5">
  <server><uptime>12</uptime></server>
  <services>
    <service name="dummy">
      <type>3</type><status>0</status><status_message></status_message>
      <monitor>1</monitor><pendingaction>0</pendingaction><uptime>880183</uptime>
      <children>2</children>
      <memory><percent>0.1</percent><percenttotal>0.4</percenttotal><kilobyte>1000</kilobyte><kilobytetotal>4004</kilobytetotal></memory>
      <cpu><percent>1.5</percent><percenttotal>2.5</percenttotal></cpu>
    </service>
    <service name="broken"><status>2</status><status_message>process is not running</status_message><monitor>1</monitor><pendingaction>1</pendingaction></service>
    <service name="system_abc"><status>0</status><monitor>1</monitor></service>
  </services>
  <servicegroups>
    <servicegroup name="vcap"><service>dummy</service><service>broken</service></servicegroup>
    <servicegroup name="other"><service>system_abc</service></servicegroup>
  </servicegroups>
</monit>"#;
        let status = parse_status(xml).unwrap();
        assert_eq!(status.incarnation_number().unwrap(), 1_397_596_592);
        let vcap = status.services_in_group("vcap");
        assert_eq!(vcap.len(), 2);
        assert_eq!(
            vcap[0],
            Service {
                name: "dummy".into(),
                monitored: true,
                errored: false,
                pending: false,
                status: ProcessState::Running,
                status_message: String::new(),
                uptime: 880_183,
                memory_percent_total: 0.4,
                memory_kilobytes_total: 4004,
                cpu_percent_total: 2.5,
            }
        );
        assert_eq!(status.services[0].children, 2);
        assert!(vcap[1].errored && vcap[1].pending);
        assert_eq!(vcap[1].status_message, "process is not running");
    }

    #[test]
    fn latin1_bytes_are_decoded() {
        let xml = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><monit><services><service name=\"caf\xe9\"/></services></monit>";
        let status = parse_status(xml).unwrap();
        assert_eq!(status.services[0].name, "caf\u{e9}");
    }

    #[test]
    fn state_covers_every_branch() {
        let s = |monitor, status| ServiceStatus {
            monitor,
            status,
            ..ServiceStatus::default()
        };
        assert_eq!(s(0, 0).state(), ProcessState::Unknown);
        assert_eq!(s(0, 512).state(), ProcessState::Unknown);
        assert_eq!(s(2, 0).state(), ProcessState::Starting);
        assert_eq!(s(2, 512).state(), ProcessState::Starting);
        assert_eq!(s(1, 0).state(), ProcessState::Running);
        assert_eq!(s(1, 512).state(), ProcessState::Failing);
    }

    #[test]
    fn bad_documents_are_errors_not_panics() {
        for (xml, needle) in [
            (&b""[..], "Unmarshalling"),
            (b"<monit><services>", "Unmarshalling"),
            (b"<html><body>Unauthorized</body></html>", "<html>"),
            (
                b"<monit><services><service name=\"a\"><uptime>x</uptime></service></services></monit>",
                "service \"a\" field uptime is \"x\"",
            ),
            (
                b"<monit><services><service name=\"a\"><cpu><percent>NaN</percent></cpu></service></services></monit>",
                "cpu/percent",
            ),
            (
                b"<!DOCTYPE monit [<!ENTITY x \"y\">]><monit/>",
                "Unmarshalling",
            ),
        ] {
            let err = parse_status(xml).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let status = parse_status(b"<monit incarnation=\"soon\"/>").unwrap();
        assert!(status.incarnation_number().is_err());
    }

    #[test]
    fn process_state_serializes_lowercase() {
        assert_eq!(
            serde_json::to_string(&ProcessState::Failing).unwrap(),
            "\"failing\""
        );
        assert_eq!(ProcessState::Starting.to_string(), "starting");
    }
}
