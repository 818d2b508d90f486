//! What a tenant is told about its instance's failures.
//!
//! A unit's error is whatever an adapter said: AWS, Kubernetes or a mail server's words, which
//! can name accounts, subnets, hosts or an operator's token. Operators need that text; tenants
//! need to know what happened and what to expect. So a tenant caller of InstanceService gets a
//! curated `last_error` ("provisioning failed and waits for an operator (unit 42)"), while
//! admin callers of InstanceService and every WorkService caller keep the raw text.
//!
//! The `Ready` condition of a parked or cancelled unit is curated where it is written
//! ([`crate::kinds::conditions`] keeps the raw text out of it and in the unit's history);
//! a condition written by an older version still holds raw text, so the tenant view writes
//! those two messages again from the unit they name.

use serde_json::Value;

use super::auth::Caller;
use super::status::InstanceState;
use crate::kinds::conditions::{self, READY};
use crate::store::instances::InstanceRow;

/// Who an instance is shown to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// A tenant's token: curated failure messages.
    Tenant,
    /// An admin token: the raw text.
    Operator,
}

impl Audience {
    /// The audience of `caller`.
    pub fn of(caller: &Caller) -> Self {
        if caller.admin {
            Self::Operator
        } else {
            Self::Tenant
        }
    }
}

/// A tenant's `last_error` of `row`: what the newest unit's failure means for the instance,
/// without its text; empty when it has not failed.
pub fn last_error(row: &InstanceRow) -> String {
    if row.last_error.as_deref().unwrap_or_default().is_empty() {
        return String::new();
    }
    let unit = row.active_work_id.unwrap_or(0);
    let what = match (
        InstanceState::from_db(&row.status),
        row.operation.as_deref(),
    ) {
        (InstanceState::Creating, _) | (InstanceState::Failed, Some("create")) => "provisioning",
        (InstanceState::Updating, _) | (InstanceState::Failed, Some("update")) => "the update",
        (InstanceState::Deleting, _) | (InstanceState::Failed, Some("delete")) => "the deletion",
        (InstanceState::Ready, _) => "a check of the instance",
        _ => "the instance's work",
    };
    if row.has_active_work {
        format!("{what} ran into a problem and is retried automatically (unit {unit})")
    } else {
        format!("{what} failed and waits for an operator (unit {unit})")
    }
}

/// A tenant's view of `observed`: the messages of a `Ready` condition about a parked or
/// cancelled unit are written anew (see the module documentation); everything else is as
/// stored.
pub fn observed(observed: &Value) -> Value {
    let mut out = observed.clone();
    let Some(list) = out.get_mut("conditions").and_then(Value::as_array_mut) else {
        return out;
    };
    for c in list.iter_mut() {
        if c.get("type").and_then(Value::as_str) != Some(READY) {
            continue;
        }
        let unit = c
            .get("message")
            .and_then(Value::as_str)
            .and_then(conditions::message_unit)
            .unwrap_or(0);
        let message = match c.get("reason").and_then(Value::as_str) {
            Some("WorkParked") => conditions::parked_message(unit),
            Some("WorkCancelled") => conditions::cancelled_message(unit),
            _ => continue,
        };
        if let Some(obj) = c.as_object_mut() {
            obj.insert("message".into(), Value::String(message));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn row(status: &str, operation: &str, active: bool, error: Option<&str>) -> InstanceRow {
        InstanceRow {
            kind: "kvx.instance".into(),
            id: Uuid::nil(),
            tenant: "acme".into(),
            name: "web-1".into(),
            spec: json!({}),
            spec_version: 1,
            generation: 1,
            observed: json!({}),
            observed_generation: 0,
            status: status.into(),
            has_active_work: active,
            operation: Some(operation.into()),
            active_work_id: Some(42),
            last_error: error.map(str::to_owned),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            deleted_at: None,
        }
    }

    #[test]
    fn a_tenant_reads_what_happened_never_the_raw_text() {
        let raw = "InvalidAMIID.NotFound: ami-123 in account 111122223333 (api:token-7@ops)";
        let parked = last_error(&row("FAILED", "create", false, Some(raw)));
        assert_eq!(
            parked,
            "provisioning failed and waits for an operator (unit 42)"
        );
        let retrying = last_error(&row("UPDATING", "update", true, Some(raw)));
        assert_eq!(
            retrying,
            "the update ran into a problem and is retried automatically (unit 42)"
        );
        assert_eq!(
            last_error(&row("FAILED", "delete", false, Some(raw))),
            "the deletion failed and waits for an operator (unit 42)"
        );
        assert_eq!(last_error(&row("READY", "create", true, None)), "");
    }

    #[test]
    fn old_raw_condition_messages_are_written_anew_for_tenants() {
        let stored = json!({"machine": "i-1", "conditions": [
            {"type": "Ready", "status": "False", "reason": "WorkCancelled",
             "message": "unit 9 was cancelled by api:token-3@ops (customer owes money); ..."},
            {"type": "MachineAvailable", "status": "True", "reason": "MachineRunning",
             "message": "machine i-1 runs"},
        ]});
        let seen = observed(&stored);
        let text = seen.to_string();
        assert!(
            !text.contains("token-3") && !text.contains("owes"),
            "{text}"
        );
        assert_eq!(
            seen["conditions"][0]["message"],
            conditions::cancelled_message(9)
        );
        assert_eq!(seen["conditions"][1], stored["conditions"][1]);
        assert_eq!(seen["machine"], "i-1");
        let parked = json!({"conditions": [{"type": "Ready", "reason": "WorkParked",
            "message": "unit 5 is parked for an operator: SMTP 550 relay denied for 10.0.0.7"}]});
        assert_eq!(
            observed(&parked)["conditions"][0]["message"],
            conditions::parked_message(5)
        );
        assert_eq!(observed(&json!({"x": 1})), json!({"x": 1}));
    }
}
