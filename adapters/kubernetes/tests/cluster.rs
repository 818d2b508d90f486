//! The Kubernetes adapter end to end: against the test server, or a real cluster when
//! `SETPOINT_TEST_KUBECONFIG` (or `KUBECONFIG` with `SETPOINT_TEST_REAL_CLUSTER=1`) is set.

mod common;

use setpoint_adapter::Fence;
use std::time::Duration;

use common::{Env, token};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use setpoint_adapter::{CODE_SUPERSEDED, Cluster, ClusterInstanceSpec, ErrorClass, SecretData};
use setpoint_kubernetes::cluster::APPLY_ROUNDS;
use setpoint_kubernetes::error::CODE_KEPT_CHANGING;
use setpoint_kubernetes::names::{self, LABEL_INSTANCE, LABEL_TENANT, LABEL_TOKEN};
use setpoint_kubernetes::objects::{self, Generation, InstanceIdentity, Workload};
use setpoint_kubernetes::{ConcurrentWrite, FIELD_MANAGER, Fault, TestApiServer};

fn managers<K: Resource>(k: &K) -> Vec<(String, String)> {
    k.meta()
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn apply_creates_every_object_with_names_labels_and_field_manager() {
    let env = Env::new().await;
    let spec = env.spec();
    let tok = token();
    let obs = env
        .cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap();

    let name = names::object_name(spec.resource_id);
    let ns = names::namespace_name(&env.tenant);
    assert_eq!(obs.namespace, ns);
    assert!(obs.complete && obs.changed, "{obs:?}");
    assert_eq!(
        obs.service_host.as_deref(),
        Some(&*format!("{name}.{ns}.svc"))
    );
    assert_eq!(obs.objects.len(), 3);

    let namespace = Api::<Namespace>::all(env.client.clone())
        .get(&ns)
        .await
        .unwrap();
    assert_eq!(namespace.labels().get(LABEL_TENANT), Some(&env.tenant));

    let d: Deployment = env.api().get(&name).await.unwrap();
    let s: Service = env.api().get(&name).await.unwrap();
    let sec: Secret = env.api().get(&name).await.unwrap();
    for (labels, mf) in [
        (d.labels().clone(), managers(&d)),
        (s.labels().clone(), managers(&s)),
        (sec.labels().clone(), managers(&sec)),
    ] {
        assert_eq!(
            labels.get(LABEL_INSTANCE),
            Some(&spec.resource_id.to_string())
        );
        assert_eq!(labels.get(LABEL_TENANT), Some(&env.tenant));
        assert_eq!(
            labels.get(LABEL_TOKEN).map(String::as_str),
            Some(tok.as_str())
        );
        assert!(
            mf.contains(&(FIELD_MANAGER.to_owned(), "Apply".to_owned())),
            "{mf:?}"
        );
    }
    let data = sec.data.unwrap();
    assert_eq!(data["KVX_PASSWORD"].0, b"s3cr3t-value");
    let dspec = d.spec.unwrap();
    assert_eq!(dspec.replicas, Some(1));
    let env_vars = dspec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env_vars
            .iter()
            .any(|e| e.name == "KVX_BACKEND_IP" && e.value.as_deref() == Some("10.0.3.17"))
    );
    env.cleanup().await;
}

#[tokio::test]
async fn applying_twice_is_a_no_op() {
    let env = Env::new().await;
    let spec = env.spec();
    let tok = token();
    let first = env
        .cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);
    let generation = |d: &Deployment| d.metadata.generation;
    let d1: Deployment = env.api().get(&name).await.unwrap();
    let second = env
        .cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert!(!second.changed, "{second:?}");
    let d2: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(generation(&d1), generation(&d2));
    // Secret and Service have no controller writing to them: their versions must not move.
    // (A real cluster's Deployment controller writes status, so only its generation is
    // compared there; on the test server its version must not move either.)
    let stable = |o: &setpoint_adapter::ClusterObservation| {
        o.objects
            .iter()
            .filter(|x| env.is_fake() || x.kind != "Deployment")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        stable(&first),
        stable(&second),
        "resourceVersions must not move"
    );
    let observed = env
        .cluster
        .observe_instance(spec.resource_id, &spec.tenant)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stable(&observed), stable(&first));
    assert!(!observed.changed && observed.complete);
    env.cleanup().await;
}

#[tokio::test]
async fn apply_after_a_spec_change_updates_the_objects() {
    let env = Env::new().await;
    let mut spec = env.spec();
    let first = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    spec.replicas = 2;
    spec.backend.private_ip = Some("10.0.9.9".to_owned());
    spec.credentials = SecretData::from_pairs([("KVX_PASSWORD", "rotated")]);
    let tok = token();
    let second = env
        .cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert!(second.changed);
    assert_eq!(second.desired_replicas, 2);
    for (a, b) in first.objects.iter().zip(&second.objects) {
        assert_eq!(a.name, b.name);
        assert_ne!(a.version, b.version, "{} must change", a.kind);
    }
    let name = names::object_name(spec.resource_id);
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(
        d.labels().get(LABEL_TOKEN).map(String::as_str),
        Some(tok.as_str())
    );
    assert_eq!(d.spec.unwrap().replicas, Some(2));
    let sec: Secret = env.api().get(&name).await.unwrap();
    assert_eq!(sec.data.unwrap()["KVX_PASSWORD"].0, b"rotated");
    env.cleanup().await;
}

#[tokio::test]
async fn delete_removes_everything_labelled_and_is_idempotent() {
    let env = Env::new().await;
    let spec = env.spec();
    let mut other = env.spec();
    other.resource_id = uuid::Uuid::new_v4();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    env.cluster
        .apply_instance(&token(), &other, &Fence::unbounded())
        .await
        .unwrap();

    let tok = token();
    let out = env
        .cluster
        .delete_instance(&tok, spec.resource_id, &spec.tenant, &Fence::unbounded())
        .await
        .unwrap();
    assert!(!out.already_absent);
    assert_eq!(out.deleted.len(), 3, "{out:?}");

    let selector = format!("{LABEL_INSTANCE}={}", spec.resource_id);
    let lp = ListParams::default().labels(&selector);
    assert!(
        env.api::<Deployment>()
            .list(&lp)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        env.api::<Service>()
            .list(&lp)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        env.api::<Secret>()
            .list(&lp)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        env.cluster
            .observe_instance(spec.resource_id, &spec.tenant)
            .await
            .unwrap(),
        None
    );
    // The other instance of the tenant is untouched.
    assert!(
        env.cluster
            .observe_instance(other.resource_id, &other.tenant)
            .await
            .unwrap()
            .is_some_and(|o| o.complete)
    );

    // Twice: success, nothing left.
    let again = env
        .cluster
        .delete_instance(&tok, spec.resource_id, &spec.tenant, &Fence::unbounded())
        .await
        .unwrap();
    assert!(again.already_absent && again.deleted.is_empty());
    // A tenant that never had a namespace: success too.
    let none = env
        .cluster
        .delete_instance(
            &tok,
            uuid::Uuid::new_v4(),
            "never-existed-tenant",
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert!(none.already_absent);
    env.cleanup().await;
}

#[tokio::test]
async fn a_field_owned_by_another_manager_is_a_clear_permanent_error() {
    let env = Env::new().await;
    let spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();

    // Someone scales the Deployment by hand with their own apply, forcing ownership.
    let name = names::object_name(spec.resource_id);
    let manual = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": 5},
    });
    env.api::<Deployment>()
        .patch(
            &name,
            &PatchParams::apply("ops-team").force(),
            &Patch::Apply(&manual),
        )
        .await
        .unwrap();

    let err = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("FieldManagerConflict"));
    assert!(err.message.contains("ops-team"), "{err}");
    assert!(err.message.contains(".spec.replicas"), "{err}");
    assert!(err.message.contains("force_conflicts"), "{err}");

    // With force_conflicts, setpoint takes the field back.
    let mut forced_cfg = env.config.clone();
    forced_cfg.force_conflicts = true;
    let forced =
        setpoint_kubernetes::KubernetesCluster::with_client(env.client.clone(), &forced_cfg);
    let obs = forced
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.desired_replicas, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_invalid_object_is_permanent() {
    let env = Env::new().await;
    let mut spec = env.spec();
    spec.credentials = SecretData::from_pairs([("not a valid key!", "x")]);
    let err = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some("Invalid"));
    assert!(err.message.contains("not a valid key!"), "{err}");
    assert!(
        !err.message.contains("\"x\""),
        "no secret values in errors: {err}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn throttling_is_transient_and_carries_retry_after() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: fault injection needs the test server");
        return;
    };
    server.inject(
        Fault::Status {
            code: 429,
            retry_after: Some(7),
        },
        1,
    );
    let err = env
        .cluster
        .apply_instance(&token(), &env.spec(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.retry_after, Some(Duration::from_secs(7)));
    // The fault is used up: the retry succeeds.
    env.cluster
        .apply_instance(&token(), &env.spec(), &Fence::unbounded())
        .await
        .unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_transient() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: fault injection needs the test server");
        return;
    };
    for code in [500, 503] {
        server.inject(
            Fault::Status {
                code,
                retry_after: None,
            },
            1,
        );
        let err = env
            .cluster
            .apply_instance(&token(), &env.spec(), &Fence::unbounded())
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Transient, "{code}: {err}");
    }
    server.inject(Fault::Hangup, 1);
    let err = env
        .cluster
        .delete_instance(
            &token(),
            uuid::Uuid::new_v4(),
            &env.tenant,
            &Fence::unbounded(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn timeouts_are_transient() {
    let env = Env::with(|c| c.request_timeout_secs = 1).await;
    let Some(server) = &env.server else {
        eprintln!("skipped: fault injection needs the test server");
        return;
    };
    // Far longer than the client's timeout, so the outcome does not depend on machine speed.
    server.inject(Fault::Delay(Duration::from_secs(120)), 1);
    let err = env
        .cluster
        .observe_instance(uuid::Uuid::new_v4(), &env.tenant)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some("timeout"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let mut env = Env::new().await;
    let Some(server) = env.server.as_mut() else {
        eprintln!("skipped: needs the test server");
        return;
    };
    server.stop().await;
    let err = env
        .cluster
        .apply_instance(&token(), &env.spec(), &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some("connection"), "{err}");
}

// ---- Conditional writes: generations and resourceVersion preconditions ----

fn generation_of<K: Resource>(k: &K) -> Option<String> {
    k.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_GENERATION).cloned())
}

fn deployment_path(env: &Env, name: &str) -> String {
    format!(
        "/apis/apps/v1/namespaces/{}/deployments/{name}",
        names::namespace_name(&env.tenant)
    )
}

fn secret_path(env: &Env, name: &str) -> String {
    format!(
        "/api/v1/namespaces/{}/secrets/{name}",
        names::namespace_name(&env.tenant)
    )
}

/// What a newer unit of the same instance would apply: the adapter's own intents for `spec`
/// at `generation`, as concurrent writes of field manager `setpoint`.
fn newer_unit_writes(env: &Env, spec: &ClusterInstanceSpec) -> Vec<ConcurrentWrite> {
    let id = InstanceIdentity::new(spec.resource_id, &spec.tenant);
    let tok = token();
    let generation = Generation(Some(spec.generation));
    let workload = Workload {
        image: env.config.image.clone(),
        port: env.config.port,
    };
    let apply = |path: String, body: serde_json::Value| ConcurrentWrite::Apply {
        path,
        manager: FIELD_MANAGER.to_owned(),
        force: false,
        body,
    };
    let ns = names::namespace_name(&env.tenant);
    vec![
        apply(
            secret_path(env, &id.name),
            serde_json::to_value(objects::secret(&id, spec, &tok, generation)).unwrap(),
        ),
        apply(
            format!("/api/v1/namespaces/{ns}/services/{}", id.name),
            serde_json::to_value(objects::service(&id, spec, &tok, generation, &workload)).unwrap(),
        ),
        apply(
            deployment_path(env, &id.name),
            serde_json::to_value(objects::deployment(&id, spec, &tok, generation, &workload))
                .unwrap(),
        ),
    ]
}

/// An annotation by another field manager: a change to the object that is no conflict.
fn ops_note(path: String, kind: (&str, &str), name: &str, note: &str) -> ConcurrentWrite {
    ConcurrentWrite::Apply {
        path,
        manager: "ops-team".to_owned(),
        force: false,
        body: json!({
            "apiVersion": kind.0, "kind": kind.1,
            "metadata": {"name": name, "annotations": {"ops.example/note": note}},
        }),
    }
}

/// The codes the server answered to `method path`, in order.
fn answers(server: &TestApiServer, method: &str, path: &str) -> Vec<u16> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == method && r.path == path)
        .map(|r| r.code)
        .collect()
}

#[tokio::test]
async fn the_generation_is_recorded_on_metadata_only_so_a_reapply_restarts_nothing() {
    let env = Env::new().await;
    let mut spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);
    let d1: Deployment = env.api().get(&name).await.unwrap();
    let s: Service = env.api().get(&name).await.unwrap();
    let sec: Secret = env.api().get(&name).await.unwrap();
    for g in [generation_of(&d1), generation_of(&s), generation_of(&sec)] {
        assert_eq!(g.as_deref(), Some("1"));
    }
    let template = d1.spec.clone().unwrap().template.metadata.unwrap();
    assert!(
        template
            .annotations
            .unwrap_or_default()
            .keys()
            .all(|k| !k.starts_with("setpoint.dev/")),
        "nothing of setpoint's bookkeeping on the pod template"
    );

    // The next generation with the same spec (a new unit, a new token): only metadata moves,
    // so the Deployment's own generation (its pod template's) stays and no pod restarts.
    spec.generation = 2;
    let obs = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert!(obs.changed);
    let d2: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(generation_of(&d2).as_deref(), Some("2"));
    assert_eq!(d1.metadata.generation, d2.metadata.generation);
    assert_eq!(d1.spec.unwrap().template, d2.spec.unwrap().template);
    env.cleanup().await;
}

#[tokio::test]
async fn an_older_generation_changes_nothing_and_says_superseded() {
    let env = Env::new().await;
    let mut spec = env.spec();
    spec.generation = 3;
    let applied = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();

    let mut older = spec.clone();
    older.generation = 2;
    older.replicas = 2;
    older.credentials = SecretData::from_pairs([("KVX_PASSWORD", "older")]);
    let err = env
        .cluster
        .apply_instance(&token(), &older, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert_eq!(err.code.as_deref(), Some(CODE_SUPERSEDED));
    assert!(
        err.message.contains("holds generation 3")
            && err.message.contains("this unit's generation 2"),
        "{err}"
    );

    // Nothing moved: versions (the controller-free objects on a real cluster), content and
    // the recorded generation.
    let seen = env
        .cluster
        .observe_instance(spec.resource_id, &spec.tenant)
        .await
        .unwrap()
        .unwrap();
    let stable = |o: &setpoint_adapter::ClusterObservation| {
        o.objects
            .iter()
            .filter(|x| env.is_fake() || x.kind != "Deployment")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(stable(&seen), stable(&applied));
    let name = names::object_name(spec.resource_id);
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(generation_of(&d).as_deref(), Some("3"));
    let sec: Secret = env.api().get(&name).await.unwrap();
    assert_eq!(sec.data.unwrap()["KVX_PASSWORD"].0, b"s3cr3t-value");

    // The same generation again, a newer one, and one of unknown generation (0) all apply;
    // the unknown one keeps the recorded generation.
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let mut newer = spec.clone();
    newer.generation = 4;
    env.cluster
        .apply_instance(&token(), &newer, &Fence::unbounded())
        .await
        .unwrap();
    let mut unknown = spec.clone();
    unknown.generation = 0;
    unknown.replicas = 3;
    let obs = env
        .cluster
        .apply_instance(&token(), &unknown, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.desired_replicas, 3);
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(generation_of(&d).as_deref(), Some("4"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_concurrent_write_between_read_and_write_makes_the_apply_read_again_and_converge() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    let mut spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);

    // Between the apply's reads and its Deployment write, an operator annotates the Deployment.
    let path = deployment_path(&env, &name);
    server.before_request(
        "PATCH",
        &path,
        vec![ops_note(
            path.clone(),
            ("apps/v1", "Deployment"),
            &name,
            "hands off",
        )],
    );
    spec.generation = 2;
    spec.replicas = 2;
    let obs = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(obs.desired_replicas, 2);
    assert!(obs.changed);

    // The write based on the stale read was refused (409), the apply read again and wrote:
    // both changes are there.
    let codes = answers(server, "PATCH", &path);
    assert_eq!(codes[codes.len() - 2..], [409, 200], "{codes:?}");
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(d.spec.clone().unwrap().replicas, Some(2));
    assert_eq!(generation_of(&d).as_deref(), Some("2"));
    assert_eq!(
        d.annotations().get("ops.example/note").map(String::as_str),
        Some("hands off"),
        "the other writer's change survives"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_newer_generation_written_between_read_and_write_is_never_clobbered() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    let spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);

    // A stale unit (generation 2) reads; before it writes, the newer unit (generation 3)
    // writes all three objects.
    let mut newest = spec.clone();
    newest.generation = 3;
    newest.replicas = 3;
    server.before_request(
        "PATCH",
        &secret_path(&env, &name),
        newer_unit_writes(&env, &newest),
    );
    let mut stale = spec.clone();
    stale.generation = 2;
    stale.replicas = 2;
    let err = env
        .cluster
        .apply_instance(&token(), &stale, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(CODE_SUPERSEDED), "{err}");
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(generation_of(&d).as_deref(), Some("3"));
    // The stale unit's only write reached the server with a stale version and was refused.
    assert_eq!(
        answers(server, "PATCH", &secret_path(&env, &name)),
        [201, 409]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_concurrent_create_is_not_merged_into() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    // The objects do not exist when the stale unit reads them; the newer unit creates them
    // before the stale unit's first write, which carries the version of the empty read.
    let mut stale = env.spec();
    stale.generation = 4;
    let mut newest = stale.clone();
    newest.generation = 5;
    newest.replicas = 5;
    let name = names::object_name(stale.resource_id);
    server.before_request(
        "PATCH",
        &secret_path(&env, &name),
        newer_unit_writes(&env, &newest),
    );
    let err = env
        .cluster
        .apply_instance(&token(), &stale, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.code.as_deref(), Some(CODE_SUPERSEDED), "{err}");
    assert_eq!(answers(server, "PATCH", &secret_path(&env, &name)), [409]);
    let d: Deployment = env.api().get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(5));
    assert_eq!(generation_of(&d).as_deref(), Some("5"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_write_based_on_an_object_deleted_since_does_not_recreate_it() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    let mut spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);
    let before: Secret = env.api().get(&name).await.unwrap();

    // The Secret is deleted between the apply's read and its write: the write, which names
    // the object it read (uid), is refused instead of creating a new Secret from that read;
    // the apply reads again and decides afresh.
    let path = secret_path(&env, &name);
    server.before_request(
        "PATCH",
        &path,
        vec![ConcurrentWrite::Delete { path: path.clone() }],
    );
    spec.generation = 2;
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    assert_eq!(answers(server, "PATCH", &path), [201, 409, 201]);
    let after: Secret = env.api().get(&name).await.unwrap();
    assert_ne!(before.metadata.uid, after.metadata.uid);
    assert_eq!(generation_of(&after).as_deref(), Some("2"));
    env.cleanup().await;
}

#[tokio::test]
async fn an_apply_gives_up_after_a_few_rounds_of_concurrent_writes() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    let spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);
    let path = deployment_path(&env, &name);
    for round in 0..APPLY_ROUNDS {
        server.before_request(
            "PATCH",
            &path,
            vec![ops_note(
                path.clone(),
                ("apps/v1", "Deployment"),
                &name,
                &format!("busy {round}"),
            )],
        );
    }
    let err = env
        .cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some(CODE_KEPT_CHANGING));
    let codes = answers(server, "PATCH", &path);
    assert_eq!(codes.iter().filter(|c| **c == 409).count(), APPLY_ROUNDS);
    env.cleanup().await;
}

#[tokio::test]
async fn a_delete_lists_again_when_an_object_changed_after_it_was_listed() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: placing a concurrent write needs the test server");
        return;
    };
    let spec = env.spec();
    env.cluster
        .apply_instance(&token(), &spec, &Fence::unbounded())
        .await
        .unwrap();
    let name = names::object_name(spec.resource_id);
    let path = secret_path(&env, &name);
    server.before_request(
        "DELETE",
        &path,
        vec![ops_note(path.clone(), ("v1", "Secret"), &name, "rotating")],
    );
    let out = env
        .cluster
        .delete_instance(
            &token(),
            spec.resource_id,
            &spec.tenant,
            &Fence::unbounded(),
        )
        .await
        .unwrap();
    assert_eq!(out.deleted.len(), 3, "{out:?}");
    assert_eq!(answers(server, "DELETE", &path), [409, 200]);
    assert_eq!(
        env.cluster
            .observe_instance(spec.resource_id, &spec.tenant)
            .await
            .unwrap(),
        None
    );
    env.cleanup().await;
}

/// Counts the tokens taken per key and the throttles reported; grants every token.
#[derive(Default)]
struct RecordingBudgets {
    takes: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    throttles: std::sync::Mutex<Vec<String>>,
}

impl setpoint_adapter::Budgets for RecordingBudgets {
    fn take<'a>(
        &'a self,
        key: &'a setpoint_adapter::BudgetKey,
        _limit: setpoint_adapter::Limit,
    ) -> setpoint_adapter::BoxFuture<'a, Result<(), setpoint_adapter::AdapterError>> {
        Box::pin(async move {
            *self
                .takes
                .lock()
                .unwrap()
                .entry(key.to_string())
                .or_default() += 1;
            Ok(())
        })
    }

    fn throttled<'a>(
        &'a self,
        key: &'a setpoint_adapter::BudgetKey,
        _limit: setpoint_adapter::Limit,
    ) -> setpoint_adapter::BoxFuture<'a, Duration> {
        Box::pin(async move {
            self.throttles.lock().unwrap().push(key.to_string());
            Duration::from_millis(1500)
        })
    }
}

/// Every request takes a token of its class (reads: gets and lists; writes: applies and
/// deletes) under the API server's key, and a 429 lowers the shared budget of its class and
/// comes back as a wait for the budget's time, not the server's hint.
#[tokio::test]
async fn every_request_takes_a_token_of_its_class_and_a_429_lowers_that_budget() {
    let env = Env::new().await;
    let Some(server) = &env.server else {
        eprintln!("skipped: fault injection needs the test server");
        return;
    };
    let budgets = std::sync::Arc::new(RecordingBudgets::default());
    let cluster = env.cluster.clone().with_budgets(budgets.clone());
    let scope = env.config.budget_scope();
    let (reads, writes) = (
        format!("kubernetes/{scope}/global/read"),
        format!("kubernetes/{scope}/global/write"),
    );
    let spec = env.spec();
    let tok = token();
    cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap();
    // An apply reads the namespace and the three objects, then writes all four.
    let takes = budgets.takes.lock().unwrap().clone();
    assert_eq!(takes.get(&reads), Some(&4), "{takes:?}");
    assert_eq!(takes.get(&writes), Some(&4), "{takes:?}");
    cluster
        .observe_instance(spec.resource_id, &spec.tenant)
        .await
        .unwrap();
    assert_eq!(budgets.takes.lock().unwrap().get(&reads), Some(&8));

    // The first request of the next apply (a read) is throttled.
    server.inject(
        Fault::Status {
            code: 429,
            retry_after: Some(7),
        },
        1,
    );
    let err = cluster
        .apply_instance(&tok, &spec, &Fence::unbounded())
        .await
        .unwrap_err();
    assert!(err.waiting && err.throttled, "{err:?}");
    assert_eq!(
        err.retry_after,
        Some(Duration::from_millis(1500)),
        "{err:?}"
    );
    assert_eq!(*budgets.throttles.lock().unwrap(), vec![reads.clone()]);
    cluster
        .delete_instance(&tok, spec.resource_id, &spec.tenant, &Fence::unbounded())
        .await
        .unwrap();
    let takes = budgets.takes.lock().unwrap().clone();
    assert!(takes[&writes] >= 4 + 3, "three deletes: {takes:?}");
    assert_eq!(takes.len(), 2, "only the two keys: {takes:?}");
    env.cleanup().await;
}
