//! The `k8s.apply-instance` and `k8s.delete-instance` handlers as the engine runs them.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Env, token};
use serde_json::json;
use setpoint_adapter::{ErrorClass, Handler, MemoryJournal, WorkContext, typed};
use setpoint_kubernetes::{
    ApplyInstance, DeleteInstance, KIND_APPLY_INSTANCE, KIND_DELETE_INSTANCE,
};
use uuid::Uuid;

fn ctx(kind: &str, resource_id: Option<Uuid>, tenant: Option<String>) -> WorkContext {
    let c = WorkContext::new(
        1,
        kind,
        token(),
        1,
        Instant::now() + Duration::from_secs(60),
        Arc::new(MemoryJournal::default()),
    );
    match resource_id {
        Some(id) => c.with_resource(id, tenant),
        None => c,
    }
}

#[tokio::test]
async fn apply_and_delete_units_record_what_they_saw() {
    let env = Env::new().await;
    let cluster = Arc::new(env.cluster.clone());
    let apply = typed(ApplyInstance::new(cluster.clone()));
    let delete = typed(DeleteInstance::new(cluster));
    assert_eq!(apply.kind(), KIND_APPLY_INSTANCE);
    assert_eq!(delete.kind(), KIND_DELETE_INSTANCE);

    let spec = env.spec();
    let spec_json = serde_json::to_value(&spec).unwrap();
    let c = ctx(
        KIND_APPLY_INSTANCE,
        Some(spec.resource_id),
        Some(env.tenant.clone()),
    );
    let out = apply.handle(&c, &spec_json).await.unwrap();
    assert_eq!(c.calls().len(), 1, "the adapter call is recorded");
    let k8s = &out.observed.unwrap()["kubernetes"];
    assert_eq!(k8s["complete"], true);
    assert_eq!(
        k8s["namespace"],
        setpoint_kubernetes::names::namespace_name(&env.tenant)
    );
    assert!(
        !k8s.to_string().contains("s3cr3t-value"),
        "no secret in observed state"
    );

    // Delete with an empty spec: resource id and tenant come from the unit.
    let c = ctx(
        KIND_DELETE_INSTANCE,
        Some(spec.resource_id),
        Some(env.tenant.clone()),
    );
    let out = delete.handle(&c, &json!({})).await.unwrap();
    let k8s = &out.observed.unwrap()["kubernetes"];
    assert_eq!(k8s["deleted"], true);
    assert_eq!(k8s["already_absent"], false);
    let out = delete.handle(&c, &json!({})).await.unwrap();
    assert_eq!(out.observed.unwrap()["kubernetes"]["already_absent"], true);
    env.cleanup().await;
}

#[tokio::test]
async fn malformed_units_are_permanent() {
    let env = Env::new().await;
    let cluster = Arc::new(env.cluster.clone());
    let apply = typed(ApplyInstance::new(cluster.clone()));
    let delete = typed(DeleteInstance::new(cluster));
    let c = ctx(KIND_APPLY_INSTANCE, None, None);
    let err = apply.handle(&c, &json!({"tenant": "x"})).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert_eq!(err.code.as_deref(), Some("invalid-spec"));
    let err = delete.handle(&c, &json!({})).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    env.cleanup().await;
}
