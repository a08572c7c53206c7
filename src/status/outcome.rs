//! What `kpr status` concludes, for scripts and monitoring checks: the
//! agent's problems, the error object when the agent cannot be asked, and
//! the exit code. The codes follow the monitoring-plugin convention
//! (Nagios, Icinga: OK, WARNING, CRITICAL, UNKNOWN), so `kpr status` works
//! as a node check as it is:
//!
//! | code | [`Health`] | meaning |
//! |------|------------|---------|
//! | 0 | `healthy` | the agent answered and reports no problem |
//! | 1 | `problems` | the agent answered and reports problems (no sync yet, the last sync failed, Services refused, a watcher failing, no Node object, devices missing or failing) |
//! | 2 | `unreachable` | the agent could not be asked: nothing listens, it answered an HTTP error, or not with its status |
//! | 3 | | `kpr status` itself failed: bad usage, or the report could not be written |

use std::net::SocketAddr;

use serde::Serialize;

use super::{AgentStatus, WatcherState};

/// Exit code: the agent reports no problem.
pub const EXIT_HEALTHY: u8 = 0;
/// Exit code: the agent reports problems.
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code: the agent could not be asked.
pub const EXIT_UNREACHABLE: u8 = 2;
/// Exit code: bad usage, or the report could not be written.
pub const EXIT_UNKNOWN: u8 = 3;

/// The conclusion (`health` in the JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The agent reports no problem.
    Healthy,
    /// The agent reports problems (listed in `problems`).
    Problems,
    /// The agent could not be asked (see `error`).
    Unreachable,
}

impl Health {
    /// The exit code of `kpr status` (see the module doc).
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => EXIT_HEALTHY,
            Health::Problems => EXIT_PROBLEMS,
            Health::Unreachable => EXIT_UNREACHABLE,
        }
    }
}

/// Why the agent's status could not be read (`kind` in the JSON error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorKind {
    /// No connection, or no complete answer (nothing listens, a timeout).
    Unreachable,
    /// An HTTP answer other than 200 (e.g. 404 to a client that is not on
    /// loopback).
    HttpStatus,
    /// A 200 whose body is not the agent's status (not kpr on that port?).
    BadAnswer,
}

/// The JSON error object of `kpr status -o json` when the agent cannot be
/// asked: `{"kind": "unreachable", "address": "127.0.0.1:10249",
/// "http_status": null, "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentError {
    /// What went wrong.
    pub kind: AgentErrorKind,
    /// Where the agent was asked (`--metrics-addr`).
    pub address: SocketAddr,
    /// The HTTP status, for [`AgentErrorKind::HttpStatus`].
    pub http_status: Option<u16>,
    /// The error in words.
    pub message: String,
}

/// Reads the agent's `/status` at `addr` (its metrics address).
pub fn fetch(addr: SocketAddr) -> Result<AgentStatus, AgentError> {
    let error = |kind, http_status, message: String| AgentError {
        kind,
        address: addr,
        http_status,
        message,
    };
    let (code, body) = crate::http::blocking_get(addr, "/status").map_err(|e| {
        error(
            AgentErrorKind::Unreachable,
            None,
            format!("agent not reachable at {addr}: {e}"),
        )
    })?;
    if code != 200 {
        return Err(error(
            AgentErrorKind::HttpStatus,
            Some(code),
            format!("agent at {addr} answered {code} to /status"),
        ));
    }
    serde_json::from_str(&body).map_err(|e| {
        error(
            AgentErrorKind::BadAnswer,
            None,
            format!("bad /status answer from {addr}: {e}"),
        )
    })
}

/// The problems the agent reports, in words, most fundamental first;
/// empty when it is healthy.
pub fn problems(a: &AgentStatus) -> Vec<String> {
    let mut out = Vec::new();
    match a.last_sync_ok {
        None => out.push("no sync has completed yet".to_string()),
        Some(false) => out.push("the last sync failed".to_string()),
        Some(true) => {}
    }
    if !a.unprogrammed.is_empty() {
        out.push(format!(
            "{} Service(s) not programmed",
            a.unprogrammed.len()
        ));
    }
    for (kind, w) in &a.watchers {
        if w.state == WatcherState::Failing {
            out.push(format!("watcher {kind} failing"));
        }
    }
    if a.own_node_found == Some(false) {
        out.push(format!(
            "no Node object named {}",
            a.node_name.as_deref().unwrap_or("?")
        ));
    }
    if let Some(d) = &a.devices {
        if !d.missing.is_empty() {
            out.push(format!("devices missing: {}", d.missing.join(" ")));
        }
        if d.last_error.is_some() {
            out.push("the last attachment to devices failed".to_string());
        }
    }
    out
}

/// The conclusion from the agent's answer.
pub fn health(agent: &Result<AgentStatus, AgentError>) -> Health {
    match agent {
        Err(_) => Health::Unreachable,
        Ok(a) if problems(a).is_empty() => Health::Healthy,
        Ok(_) => Health::Problems,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DeviceStatus, WatcherStatus};
    use super::*;

    fn healthy() -> AgentStatus {
        AgentStatus {
            last_sync_ok: Some(true),
            ..AgentStatus::default()
        }
    }

    #[test]
    fn a_clean_last_sync_is_healthy_and_exits_0() {
        let agent = Ok(healthy());
        assert_eq!(health(&agent), Health::Healthy);
        assert_eq!(health(&agent).exit_code(), 0);
    }

    #[test]
    fn each_reported_problem_exits_1_and_is_named() {
        let cases: Vec<(AgentStatus, &str)> = vec![
            (AgentStatus::default(), "no sync has completed yet"),
            (
                AgentStatus {
                    last_sync_ok: Some(false),
                    ..healthy()
                },
                "the last sync failed",
            ),
            (
                AgentStatus {
                    unprogrammed: vec![crate::status::UnprogrammedService {
                        service: "t/big".into(),
                        reason: "too_many_backends".into(),
                        message: "too many backends".into(),
                    }],
                    ..healthy()
                },
                "1 Service(s) not programmed",
            ),
            (
                {
                    let mut a = healthy();
                    a.watchers.insert(
                        "service".into(),
                        WatcherStatus {
                            state: WatcherState::Failing,
                            ..WatcherStatus::default()
                        },
                    );
                    a
                },
                "watcher service failing",
            ),
            (
                AgentStatus {
                    own_node_found: Some(false),
                    node_name: Some("node-a".into()),
                    ..healthy()
                },
                "no Node object named node-a",
            ),
            (
                AgentStatus {
                    devices: Some(DeviceStatus {
                        missing: vec!["eth1".into()],
                        ..DeviceStatus::default()
                    }),
                    ..healthy()
                },
                "devices missing: eth1",
            ),
        ];
        for (agent, problem) in cases {
            assert_eq!(problems(&agent), vec![problem.to_string()]);
            assert_eq!(health(&Ok(agent)).exit_code(), 1, "{problem}");
        }
    }

    #[test]
    fn an_agent_that_cannot_be_asked_exits_2_with_an_error_object() {
        let addr: SocketAddr = "127.0.0.1:10249".parse().expect("an address");
        let agent = Err(AgentError {
            kind: AgentErrorKind::HttpStatus,
            address: addr,
            http_status: Some(404),
            message: "agent at 127.0.0.1:10249 answered 404 to /status".into(),
        });
        assert_eq!(health(&agent), Health::Unreachable);
        assert_eq!(health(&agent).exit_code(), 2);
        let json = serde_json::to_value(agent.as_ref().expect_err("an error")).expect("JSON");
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "http_status",
                "address": "127.0.0.1:10249",
                "http_status": 404,
                "message": "agent at 127.0.0.1:10249 answered 404 to /status",
            })
        );
    }
}
