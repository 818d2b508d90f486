//! Conversions between the store's rows (JSON, chrono) and the API's messages (protobuf
//! `Struct`, `Timestamp`).

use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use serde_json::Value;

use super::proto::{Instance, InstanceSpec, WorkEvent, WorkUnit};
use super::status::InstanceState;
use super::tenant_view::{self, Audience};
use crate::store::events::WorkEvent as EventRow;
use crate::store::instances::InstanceRow;
use crate::store::work::WorkRow;

/// A timestamp message.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf value from JSON.
pub fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf `Struct` from a JSON object (anything else becomes `{"value": v}`).
pub fn json_to_struct(v: &Value) -> prost_types::Struct {
    match v {
        Value::Object(m) => prost_types::Struct {
            fields: m
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        other => prost_types::Struct {
            fields: [("value".to_owned(), json_to_value(other))]
                .into_iter()
                .collect(),
        },
    }
}

/// 2^53: every whole number up to it is exactly a double.
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// JSON from a protobuf value.
pub fn value_to_json(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        // A Struct holds every number as a double: a whole number within the exactly
        // representable range comes back as a JSON integer, so that `300` is `300` to a
        // schema's "integer" and to a step's u32, not `300.0`.
        #[allow(clippy::cast_possible_truncation)]
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() <= MAX_EXACT_INTEGER => {
            Value::from(*n as i64)
        }
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// A JSON object from a protobuf `Struct`.
pub fn struct_to_json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

/// The spec as stored (JSON).
pub fn spec_to_json(spec: &InstanceSpec) -> Value {
    serde_json::json!({
        "plan": spec.plan,
        "region": spec.region,
        "size_gb": spec.size_gb,
        "owner_email": spec.owner_email,
    })
}

/// The spec from its stored JSON.
pub fn spec_from_json(v: &Value) -> InstanceSpec {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    InstanceSpec {
        plan: s("plan"),
        region: s("region"),
        size_gb: v
            .get("size_gb")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or(0),
        owner_email: s("owner_email"),
    }
}

/// The resource name of a tenant's instance.
pub fn instance_name(tenant: &str, name: &str) -> String {
    format!("tenants/{tenant}/instances/{name}")
}

/// The API's view of an instance row, with the raw failure text (an operator's view; see
/// [`instance_for`]).
pub fn instance(row: &InstanceRow) -> Instance {
    let state = InstanceState::from_db(&row.status);
    Instance {
        name: instance_name(&row.tenant, &row.name),
        uid: row.id.to_string(),
        spec: Some(spec_from_json(&row.spec)),
        status: state.proto() as i32,
        generation: row.generation,
        observed_generation: row.observed_generation,
        observed: Some(json_to_struct(&row.observed)),
        has_active_work: row.has_active_work,
        active_work_id: row.active_work_id.unwrap_or(0),
        last_error: row.last_error.clone().unwrap_or_default(),
        create_time: Some(timestamp(row.created_at)),
        update_time: Some(timestamp(row.updated_at)),
    }
}

/// `row` as `audience` sees it: for a tenant, failures are told in curated words (see
/// [`tenant_view`]); an operator sees the raw text.
pub fn instance_for(row: &InstanceRow, audience: Audience) -> Instance {
    let mut shown = instance(row);
    if audience == Audience::Tenant {
        shown.last_error = tenant_view::last_error(row);
        shown.observed = Some(json_to_struct(&tenant_view::observed(&row.observed)));
    }
    shown
}

/// The API's view of a queued unit.
pub fn work_unit(row: &WorkRow) -> WorkUnit {
    WorkUnit {
        id: row.id,
        kind: row.kind.clone(),
        state: row.state.clone(),
        token: row.token.clone(),
        resource_id: row.resource_id.map(|u| u.to_string()).unwrap_or_default(),
        tenant: row.tenant.clone().unwrap_or_default(),
        attempt: row.attempt,
        max_attempts: row.max_attempts,
        last_error: row.last_error.clone().unwrap_or_default(),
        last_error_class: row.last_error_class.clone().unwrap_or_default(),
        lease_owner: row.lease_owner.clone().unwrap_or_default(),
        run_at: Some(timestamp(row.run_at)),
        create_time: Some(timestamp(row.created_at)),
        spec: Some(json_to_struct(&row.spec)),
        events: Vec::new(),
    }
}

/// The API's view of an event.
pub fn work_event(e: &EventRow) -> WorkEvent {
    WorkEvent {
        event: e.event.clone(),
        attempt: e.attempt.unwrap_or(0),
        worker: e.worker.clone().unwrap_or_default(),
        error_class: e.error_class.clone().unwrap_or_default(),
        message: e.message.clone().unwrap_or_default(),
        detail: e.detail.as_ref().map(json_to_struct),
        time: Some(timestamp(e.at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_struct() {
        let v = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}, "n": 300});
        assert_eq!(struct_to_json(&json_to_struct(&v)), v);
        assert!(struct_to_json(&json_to_struct(&v))["n"].is_i64());
    }
}
