//! An event with its names ([`Event`]), the filters, and its two
//! printed forms: a readable line and a JSON line.

#![deny(unsafe_code)]

use serde::Serialize;

use super::event::{Hook, RawEvent, Reason};
use super::resolve::{pod_uid, Resolver};
use crate::datapath::lb_stats::Verdict;

/// An event as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Monotonic clock of the decision, ns.
    pub ts_ns: u64,
    pub hook: Hook,
    pub verdict: Option<Verdict>,
    pub reason: Reason,
    /// `10.0.0.5:43210` (`0.0.0.0:0` when the socket was not bound yet).
    pub client: String,
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    /// The client's cgroup path, when it still exists.
    pub cgroup: Option<String>,
    /// The client's pod UID, from a kubelet cgroup path.
    pub pod_uid: Option<String>,
    pub pid: u32,
    /// What the client addressed: `10.96.0.10:80/TCP`.
    pub destination: String,
    pub frontend_id: u32,
    /// The frontend of `frontend_id` in the maps (None: no frontend, or gone).
    pub frontend: Option<String>,
    /// Its Service, `namespace/name:port-name`, from the agent's record.
    pub service: Option<String>,
    pub backend_id: u32,
    pub backend: Option<String>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        _ => "?",
    }
}

fn sockaddr(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

impl Event {
    pub fn resolve(raw: &RawEvent, resolver: &mut Resolver) -> Event {
        let cgroup = resolver.cgroup(raw.cgroup_id);
        Event {
            ts_ns: raw.ts_ns,
            hook: raw.hook,
            verdict: raw.verdict,
            reason: raw.reason,
            client: sockaddr(raw.client, raw.client_port),
            netns_cookie: raw.netns_cookie,
            cgroup_id: raw.cgroup_id,
            pod_uid: cgroup.as_deref().and_then(pod_uid),
            cgroup,
            pid: raw.pid,
            destination: format!(
                "{}/{}",
                sockaddr(raw.frontend, raw.frontend_port),
                proto_name(raw.proto)
            ),
            frontend_id: raw.svc_id,
            frontend: resolver.frontend(raw.svc_id).map(|a| a.to_string()),
            service: resolver.service(raw.svc_id),
            backend_id: raw.backend_id,
            backend: resolver.backend(raw.backend_id).map(|a| a.to_string()),
        }
    }

    pub fn verdict_str(&self) -> &'static str {
        self.verdict.map_or("unknown", Verdict::as_str)
    }

    /// `12.345678 connect 10.0.0.5:43210 -> 10.96.0.10:80/TCP => 10.244.0.11:8080/TCP translated (random) pid 42 cgroup /x`
    pub fn text_line(&self) -> String {
        let secs = self.ts_ns as f64 / 1e9;
        let mut line = format!(
            "{secs:.6} {:<7} {} -> {}",
            self.hook.as_str(),
            self.client,
            self.frontend.as_deref().unwrap_or(&self.destination)
        );
        if let Some(svc) = &self.service {
            line += &format!(" ({svc})");
        }
        if let Some(b) = &self.backend {
            line += &format!(" => {b}");
        }
        line += &format!(" {}", self.verdict_str());
        if self.reason != Reason::None {
            line += &format!(" ({})", self.reason.as_str());
        }
        if self.pid != 0 {
            line += &format!(" pid {}", self.pid);
        }
        if let Some(pod) = &self.pod_uid {
            line += &format!(" pod {pod}");
        } else if let Some(c) = &self.cgroup {
            line += &format!(" cgroup {c}");
        }
        line
    }

    pub fn json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Which events are printed; every filter given must match.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    /// The frontend (`10.96.0.10:80/TCP`, or just its address) or its id.
    pub frontend: Option<String>,
    /// The Service: `namespace/name`, or `namespace/name:port-name`.
    pub service: Option<String>,
    /// The backend (`10.244.0.11:8080/TCP`, or just its address) or its id.
    pub backend: Option<String>,
    pub verdict: Option<Verdict>,
}

/// Whether `want` (`ns/name` or `ns/name:port`) names the Service `have`.
fn names_service(want: &str, have: Option<&str>) -> bool {
    have.is_some_and(|h| h == want || h.split(':').next() == Some(want))
}

/// Whether `want` names `id` or the address `have` (whole, or its IP).
fn names(want: &str, id: u32, have: Option<&str>, also: Option<&str>) -> bool {
    if want.parse::<u32>().is_ok_and(|w| w == id && id != 0) {
        return true;
    }
    [have, also].into_iter().flatten().any(|h| {
        h == want
            || h.strip_prefix(want)
                .is_some_and(|rest| rest.starts_with(':'))
            || h.split('/').next() == Some(want)
    })
}

impl Filters {
    pub fn matches(&self, e: &Event) -> bool {
        self.frontend.as_deref().is_none_or(|f| {
            names(
                f,
                e.frontend_id,
                e.frontend.as_deref(),
                Some(&e.destination),
            )
        }) && self
            .service
            .as_deref()
            .is_none_or(|s| names_service(s, e.service.as_deref()))
            && self
                .backend
                .as_deref()
                .is_none_or(|b| names(b, e.backend_id, e.backend.as_deref(), None))
            && self.verdict.is_none_or(|v| e.verdict == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            ts_ns: 1_500_000_000,
            hook: Hook::Connect,
            verdict: Some(Verdict::Translated),
            reason: Reason::Random,
            client: "10.0.0.5:43210".into(),
            netns_cookie: 1,
            cgroup_id: 0,
            cgroup: None,
            pod_uid: None,
            pid: 42,
            destination: "10.96.0.10:80/TCP".into(),
            frontend_id: 3,
            frontend: Some("10.96.0.10:80/TCP".into()),
            backend_id: 9,
            backend: Some("10.244.0.11:8080/TCP".into()),
            service: Some("default/web:http".into()),
        }
    }

    #[test]
    fn a_translated_connect_reads_as_one_line() {
        assert_eq!(
            event().text_line(),
            "1.500000 connect 10.0.0.5:43210 -> 10.96.0.10:80/TCP (default/web:http) => 10.244.0.11:8080/TCP translated (random) pid 42"
        );
        let j: serde_json::Value = serde_json::from_str(&event().json_line()).unwrap();
        assert_eq!(j["verdict"], "translated");
        assert_eq!(j["reason"], "random");
        assert_eq!(j["backend"], "10.244.0.11:8080/TCP");
        assert_eq!(j["service"], "default/web:http");
    }

    #[test]
    fn the_service_filter_takes_the_service_with_or_without_its_port() {
        let e = event();
        let f = |svc: &str| Filters {
            service: Some(svc.to_string()),
            ..Filters::default()
        };
        assert!(f("default/web").matches(&e));
        assert!(f("default/web:http").matches(&e));
        assert!(!f("default/we").matches(&e));
        assert!(!f("default/web:https").matches(&e));
        let unnamed = Event { service: None, ..e };
        assert!(!f("default/web").matches(&unnamed));
    }

    #[test]
    fn filters_match_by_address_id_or_verdict() {
        let e = event();
        let f = |frontend: Option<&str>, backend: Option<&str>, verdict| Filters {
            frontend: frontend.map(str::to_string),
            service: None,
            backend: backend.map(str::to_string),
            verdict,
        };
        assert!(f(Some("10.96.0.10"), None, None).matches(&e));
        assert!(f(Some("10.96.0.10:80"), None, None).matches(&e));
        assert!(f(Some("3"), None, None).matches(&e));
        assert!(!f(Some("10.96.0.1"), None, None).matches(&e));
        assert!(f(None, Some("10.244.0.11:8080/TCP"), None).matches(&e));
        assert!(!f(None, Some("10.244.0.12"), None).matches(&e));
        assert!(f(None, None, Some(Verdict::Translated)).matches(&e));
        assert!(!f(None, None, Some(Verdict::NoBackend)).matches(&e));
    }
}
