//! `POST` of Events: `/apis/events.k8s.io/v1/namespaces/{ns}/events` and
//! the core `/api/v1/namespaces/{ns}/events`. The stand-in validates them
//! as the apiserver does for what kpr sets (name, namespace, type, reason,
//! the events.k8s.io required fields, the note's size), records the ones
//! it accepts for [`super::ApiServer::events`] and answers 201 with
//! the object as stored. Any other `POST`: 405, as before.

use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde_json::Value;

use super::server::{error, json_response, Body, Shared};

/// What an Event's `note` may hold, in bytes (events.k8s.io/v1).
const NOTE_MAX: usize = 1024;

/// Handles one `POST` whose body was read as `body`.
pub fn post(shared: &Shared, parts: &Parts, body: Result<bytes::Bytes, String>) -> Response<Body> {
    let path = parts.uri.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, namespace) = match segments.as_slice() {
        ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] => ("events.k8s.io", *ns),
        ["api", "v1", "namespaces", ns, "events"] => ("", *ns),
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("the stand-in serves GET only, not {}", parts.method),
            )
        }
    };
    let mut event: Value =
        match body.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", e),
        };
    if let Err(message) = validate(&event, group, namespace) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
    }
    // Events are not watched here: they get a uid but no resourceVersion
    // of the store, so creating one wakes no watch.
    let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
    event["metadata"]["uid"] = Value::from(format!("event-{}", events.len() + 1));
    events.push(event.clone());
    json_response(StatusCode::CREATED, &event)
}

/// The apiserver's checks of what kpr sets.
fn validate(event: &Value, group: &str, namespace: &str) -> Result<(), String> {
    let text = |path: &[&str]| -> Option<&str> {
        let mut v = event;
        for p in path {
            v = v.get(p)?;
        }
        v.as_str()
    };
    if text(&["metadata", "name"]).is_none_or(str::is_empty) {
        return Err("metadata.name: Required value".into());
    }
    if text(&["metadata", "namespace"]).is_some_and(|ns| ns != namespace) {
        return Err("metadata.namespace: does not match the namespace of the request".into());
    }
    if !matches!(text(&["type"]), Some("Normal" | "Warning")) {
        return Err("type: Unsupported value (Normal, Warning)".into());
    }
    let required: &[&str] = if group == "events.k8s.io" {
        &[
            "reason",
            "action",
            "eventTime",
            "reportingController",
            "reportingInstance",
        ]
    } else {
        &["reason"]
    };
    for field in required {
        if text(&[field]).is_none_or(str::is_empty) {
            return Err(format!("{field}: Required value"));
        }
    }
    if text(&["note"]).is_some_and(|n| n.len() > NOTE_MAX) {
        return Err(format!(
            "note: Too long: may not be more than {NOTE_MAX} bytes"
        ));
    }
    Ok(())
}
