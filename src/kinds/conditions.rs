//! Conditions in the spirit of Kubernetes status: named facts about a resource, each `True`,
//! `False` or `Unknown`, with a machine-readable reason, a message for the resource's owner,
//! the generation they were computed for and the time their status last changed.
//!
//! Steps set conditions through their [`setpoint_adapter::StepResult`]; the engine keeps them
//! under the `conditions` key of the resource's observed state (and in the `conditions`
//! column), so `lastTransitionTime` only moves when a condition's status changes. The
//! resource's `status` (`CREATING`, `READY`, `FAILED`, …) is derived by the database from the
//! work life cycle (migrations 0002 and 0008); the conditions say *why*. The engine itself
//! sets `Ready` when a unit holding the resource is parked or cancelled, and a step's declared
//! condition when a unit beside it is.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
pub use setpoint_adapter::ConditionStatus;
use setpoint_adapter::ConditionUpdate;

/// The condition of the resource as a whole.
pub const READY: &str = "Ready";

/// One condition of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What the condition is about, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase reason, for programs, e.g. `MachineRunning`.
    pub reason: String,
    /// A sentence for a person.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The spec generation the condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// Sets condition `kind` in `conditions`: replaces an existing one of that type (keeping its
/// `lastTransitionTime` when the status is unchanged) or appends it.
pub fn set(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: i64,
) {
    let now = Utc::now();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            kind: kind.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time: now,
            observed_generation: generation,
        }),
    }
}

/// Applies a step's condition updates at `generation`.
pub fn apply(conditions: &mut Vec<Condition>, updates: &[ConditionUpdate], generation: i64) {
    for u in updates {
        set(
            conditions,
            &u.kind,
            u.status,
            &u.reason,
            u.message.clone(),
            generation,
        );
    }
}

/// The conditions stored under `observed.conditions`; anything unreadable counts as none.
pub fn from_observed(observed: &Value) -> Vec<Condition> {
    observed
        .get("conditions")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// `conditions` as stored.
pub fn to_value(conditions: &[Condition]) -> Value {
    serde_json::to_value(conditions).unwrap_or(Value::Array(Vec::new()))
}

/// The message on a resource whose chain ended with unit `work_id` parked. Tenants read it, so
/// it never holds the failure's text (a cloud provider's or a mail server's words, which can
/// name internals); that text stays in the unit's history, which operators read.
pub fn parked_message(work_id: i64) -> String {
    format!(
        "unit {work_id} failed and waits for an operator (operators: `setpoint work show \
         {work_id}` has the error; then `setpoint work retry {work_id}` once its cause is \
         fixed, or `setpoint work cancel {work_id}` to give up)"
    )
}

/// The message an owner sees on a resource whose parked unit `work_id` was cancelled.
pub fn cancelled_message(work_id: i64) -> String {
    format!(
        "unit {work_id} was cancelled by an operator; the instance did not reach its spec. \
         Change it (`setpoint instances update`) or delete it"
    )
}

/// The message on a resource whose unit `work_id`, running beside it, was parked: the
/// resource is fine; what that step was to do (a notification) may or may not have happened.
pub fn beside_parked_message(work_id: i64) -> String {
    format!(
        "unit {work_id} could not tell whether it finished and waits for an operator; the \
         resource itself is unaffected (operators: `setpoint work show {work_id}`, then \
         `setpoint work retry {work_id}` to do it again or `setpoint work cancel {work_id}`)"
    )
}

/// The message on a resource whose unit `work_id`, running beside it, was cancelled.
pub fn beside_cancelled_message(work_id: i64) -> String {
    format!("unit {work_id} was cancelled by an operator; it will not be done")
}

/// The unit a message of [`parked_message`] or [`cancelled_message`] names (the number after
/// the first `unit `), if any.
pub fn message_unit(message: &str) -> Option<i64> {
    let rest = &message[message.find("unit ")? + "unit ".len()..];
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_the_transition_time_while_the_status_holds() {
        let mut c = Vec::new();
        set(
            &mut c,
            READY,
            ConditionStatus::False,
            "Provisioning",
            "a",
            1,
        );
        let first = c[0].last_transition_time;
        set(&mut c, READY, ConditionStatus::False, "Configuring", "b", 1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, first);
        assert_eq!(c[0].reason, "Configuring");
        set(&mut c, READY, ConditionStatus::True, "Available", "c", 2);
        assert!(c[0].last_transition_time >= first);
        assert_eq!(c[0].status, ConditionStatus::True);
        set(&mut c, "Synced", ConditionStatus::True, "Applied", "d", 2);
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn serializes_like_kubernetes() {
        let mut c = Vec::new();
        set(&mut c, READY, ConditionStatus::True, "Available", "ok", 3);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v[0]["type"], "Ready");
        assert_eq!(v[0]["status"], "True");
        assert!(v[0]["lastTransitionTime"].is_string());
        assert_eq!(v[0]["observedGeneration"], 3);
        assert_eq!(from_observed(&serde_json::json!({ "conditions": v })), c);
    }

    #[test]
    fn messages_name_their_unit_and_no_failure_text() {
        assert_eq!(message_unit(&parked_message(42)), Some(42));
        assert_eq!(message_unit(&cancelled_message(7)), Some(7));
        assert!(parked_message(42).contains("setpoint work retry 42"));
    }
}
