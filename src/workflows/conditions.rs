//! Conditions in the spirit of Kubernetes status: a list of named facts about an instance, each
//! `True`, `False` or `Unknown`, with a machine-readable reason, a message for a person, and the
//! time the fact last changed.
//!
//! The workflow steps write the whole list under the `conditions` key of the instance's observed
//! state (the API returns it in `Instance.observed`); a step carries the list it wrote to the
//! next step in its spec, so `lastTransitionTime` only moves when a condition's status changes.
//! The instance's `status` (`CREATING`, `READY`, `FAILED`, …) is derived by the database from
//! the work life cycle (see `migrations/0002_api.sql`); the conditions say *why*.
//!
//! | type               | meaning when `True`                                          |
//! |--------------------|--------------------------------------------------------------|
//! | `MachineAvailable` | the instance's EC2 machine exists and runs                   |
//! | `Synced`           | the Kubernetes objects match the desired spec                |
//! | `Ready`            | the instance is usable; its owner has been told              |

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::StoreError;
use crate::store::workflows::{instance_conditions_set, instance_facts_get};

/// The condition type of the EC2 machine.
pub const MACHINE_AVAILABLE: &str = "MachineAvailable";
/// The condition type of the Kubernetes objects.
pub const SYNCED: &str = "Synced";
/// The condition type of the instance as a whole.
pub const READY: &str = "Ready";

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// Not known (yet).
    Unknown,
}

/// One condition of an instance.
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

/// The conditions stored under `observed.conditions`; anything unreadable counts as none.
pub fn from_observed(observed: &Value) -> Vec<Condition> {
    observed
        .get("conditions")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// The message on an instance whose chain ended with unit `work_id` parked. Tenants read it, so
/// it never holds the failure's text (a cloud provider's or a mail server's words, which can
/// name internals); that text stays in the unit's history, which operators read.
pub fn parked_message(work_id: i64) -> String {
    format!(
        "unit {work_id} failed and waits for an operator (operators: `setpoint work show \
         {work_id}` has the error; then `setpoint work retry {work_id}` once its cause is \
         fixed, or `setpoint work cancel {work_id}` to give up)"
    )
}

/// Marks instance `resource` as failed because unit `work_id` was parked: `Ready` becomes
/// `False` with reason `WorkParked` and [`parked_message`]. The failure's text (`_reason`) is
/// not copied to the instance: the unit's history keeps it. Called by the worker runtime in
/// the transaction that parks the unit.
///
/// # Errors
/// Database errors.
pub async fn record_parked(
    conn: &mut PgConnection,
    resource: Uuid,
    work_id: i64,
    _reason: &str,
) -> Result<(), StoreError> {
    set_not_ready(conn, resource, "WorkParked", parked_message(work_id)).await
}

/// Marks instance `resource` as having given up on the change that unit `work_id` was part of:
/// an operator cancelled the parked unit. `Ready` stays `False`, with reason `WorkCancelled` and
/// [`cancelled_message`]; the status stays `FAILED`. Who cancelled (`_operator`, a token's
/// identity) and why (`_reason`, an operator's note) are not copied to the instance, which
/// tenants read: the unit's `cancelled` event keeps both. Called in the transaction that
/// cancels the unit.
///
/// # Errors
/// Database errors.
pub async fn record_cancelled(
    conn: &mut PgConnection,
    resource: Uuid,
    work_id: i64,
    _operator: &str,
    _reason: &str,
) -> Result<(), StoreError> {
    set_not_ready(conn, resource, "WorkCancelled", cancelled_message(work_id)).await
}

/// Sets instance `resource`'s `Ready` condition to `False` with `reason` and `message`, at its
/// current generation, keeping its other conditions. No instance: nothing to do.
async fn set_not_ready(
    conn: &mut PgConnection,
    resource: Uuid,
    reason: &str,
    message: String,
) -> Result<(), StoreError> {
    let Some(facts) = instance_facts_get(conn, resource, true).await? else {
        return Ok(());
    };
    let mut conditions = from_observed(&facts.observed);
    set(
        &mut conditions,
        READY,
        ConditionStatus::False,
        reason,
        message,
        facts.generation,
    );
    let value = serde_json::to_value(&conditions).unwrap_or(Value::Array(Vec::new()));
    instance_conditions_set(conn, resource, &value).await
}

/// The message an owner sees on an instance whose parked unit `work_id` was cancelled.
pub fn cancelled_message(work_id: i64) -> String {
    format!(
        "unit {work_id} was cancelled by an operator; the instance did not reach its spec. \
         Change it (`setpoint instances update`) or delete it"
    )
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
        set(&mut c, SYNCED, ConditionStatus::True, "Applied", "d", 2);
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
    fn parked_message_names_the_operator_commands() {
        let m = parked_message(42);
        assert!(m.contains("setpoint work retry 42") && m.contains("setpoint work cancel 42"));
        assert_eq!(message_unit(&m), Some(42));
        assert_eq!(message_unit(&cancelled_message(7)), Some(7));
        assert_eq!(message_unit("no unit here"), None);
        assert_eq!(message_unit("unit x"), None);
    }
}
