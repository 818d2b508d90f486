//! The test server's API behaviour, through kube-rs (and raw HTTP where kube hides details).
//! These run against the test server only: they check the double, not the adapter.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use setpoint_adapter::ErrorClass;
use setpoint_kubernetes::{Fault, TestApiServer, classify};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server_and_client() -> (TestApiServer, kube::Client) {
    let server = TestApiServer::start().await.unwrap();
    let client = server.config().client().await.unwrap();
    (server, client)
}

fn apply() -> PatchParams {
    PatchParams::apply("tester")
}

async fn make_namespace(client: &kube::Client, name: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &apply(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
        )
        .await
        .unwrap();
}

fn config_map(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

#[tokio::test]
async fn writing_into_a_missing_namespace_is_404_for_the_namespace() {
    let (_server, client) = server_and_client().await;
    let err = Api::<ConfigMap>::namespaced(client, "nowhere")
        .patch("c", &apply(), &Patch::Apply(config_map("c", json!({}))))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = &err else {
        panic!("{err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "namespaces \"nowhere\" not found");
    assert_eq!(status.details.as_ref().unwrap().kind, "namespaces");
    assert!(classify("apply", &err).is_transient());
}

#[tokio::test]
async fn invalid_objects_are_422_with_causes() {
    let (_server, client) = server_and_client().await;
    make_namespace(&client, "ns").await;
    let bad = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "1"}},
                 "template": {"metadata": {"labels": {"a": "2"}},
                              "spec": {"containers": [{"name": "c"}]}}},
    });
    let err = Api::<Deployment>::namespaced(client, "ns")
        .patch("d", &apply(), &Patch::Apply(bad))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = &err else {
        panic!("{err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    let fields: Vec<&str> = status
        .details
        .as_ref()
        .unwrap()
        .causes
        .iter()
        .map(|c| c.field.as_str())
        .collect();
    assert!(
        fields.contains(&"spec.template.metadata.labels"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.template.spec.containers[0].image"),
        "{fields:?}"
    );
    assert_eq!(classify("apply", &err).class, ErrorClass::Permanent);
}

#[tokio::test]
async fn other_patch_types_are_refused_and_get_of_absent_is_404() {
    let (_server, client) = server_and_client().await;
    make_namespace(&client, "ns").await;
    let api = Api::<ConfigMap>::namespaced(client, "ns");
    let err = api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v"}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 415),
        "{err}"
    );
    let err = api.get("absent").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_not_found()),
        "{err}"
    );
    let err = api
        .delete("absent", &DeleteParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_not_found()),
        "{err}"
    );
}

#[tokio::test]
async fn list_selects_by_labels_and_namespace_delete_cascades() {
    let (_server, client) = server_and_client().await;
    make_namespace(&client, "a").await;
    make_namespace(&client, "b").await;
    for (ns, name, tier) in [("a", "one", "x"), ("a", "two", "y"), ("b", "three", "x")] {
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .patch(
                name,
                &apply(),
                &Patch::Apply(config_map(name, json!({"tier": tier}))),
            )
            .await
            .unwrap();
    }
    let all = Api::<ConfigMap>::all(client.clone());
    let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        l.items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect()
    };
    let x = all
        .list(&ListParams::default().labels("tier=x"))
        .await
        .unwrap();
    assert_eq!(names(x), ["one", "three"]);
    let a = Api::<ConfigMap>::namespaced(client.clone(), "a");
    let not_x = a
        .list(&ListParams::default().labels("tier!=x"))
        .await
        .unwrap();
    assert_eq!(names(not_x), ["two"]);

    Api::<Namespace>::all(client.clone())
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    let left = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(names(left), ["three"]);
}

#[tokio::test]
async fn throttling_answers_carry_retry_after_header_and_details() {
    let server = TestApiServer::start().await.unwrap();
    server.inject(
        Fault::Status {
            code: 429,
            retry_after: Some(7),
        },
        1,
    );
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 429"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 7"), "{raw}");
    assert!(raw.contains("\"retryAfterSeconds\":7"), "{raw}");
}

#[tokio::test]
async fn stop_closes_the_port_and_is_idempotent() {
    let mut server = TestApiServer::start().await.unwrap();
    let addr = server.addr();
    server.stop().await;
    server.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_required_token_is_checked_and_token_access_sends_it() {
    use setpoint_kubernetes::config::BearerToken;
    use setpoint_kubernetes::{ClusterAccess, KubernetesConfig};
    let server = TestApiServer::start().await.unwrap();
    server.require_token(Some("sa-token"));
    let with = |token: &str| {
        KubernetesConfig::new(ClusterAccess::Token {
            url: server.url(),
            token: BearerToken::new(token),
            certificate_authority_data: None,
        })
    };
    // Without a token, or with a wrong one: 401, a permanent error.
    for config in [server.config(), with("wrong")] {
        let client = config.client().await.unwrap();
        let err = Api::<Namespace>::all(client)
            .get("default")
            .await
            .unwrap_err();
        let kube::Error::Api(status) = &err else {
            panic!("{err}")
        };
        assert_eq!((status.code, status.reason.as_str()), (401, "Unauthorized"));
        assert!(!classify("get", &err).is_transient());
    }
    // Token access sends `Authorization: Bearer <token>`.
    let client = with("sa-token").client().await.unwrap();
    make_namespace(&client, "ns").await;
    server.require_token(None);
    let anyone = server.config().client().await.unwrap();
    Api::<Namespace>::all(anyone).get("ns").await.unwrap();
}

#[tokio::test]
async fn preconditions_travel_in_kube_requests_and_fail_with_409() {
    use kube::api::Preconditions;
    use setpoint_kubernetes::error::is_stale_write;
    let (server, client) = server_and_client().await;
    make_namespace(&client, "ns").await;
    let api = Api::<ConfigMap>::namespaced(client, "ns");

    // A name-selected list finds nothing yet, and says at which version it looked.
    let empty = api
        .list(&ListParams::default().fields("metadata.name=c"))
        .await
        .unwrap();
    assert!(empty.items.is_empty());
    let seen_absent = empty.metadata.resource_version.unwrap();

    let created = api
        .patch("c", &apply(), &Patch::Apply(config_map("c", json!({}))))
        .await
        .unwrap();
    let v1 = created.metadata.resource_version.clone().unwrap();

    // An apply carrying the version of the empty list meets an object now: 409.
    let mut stale = config_map("c", json!({"x": "1"}));
    stale["metadata"]["resourceVersion"] = json!(seen_absent);
    let err = api
        .patch("c", &apply(), &Patch::Apply(&stale))
        .await
        .unwrap_err();
    assert!(is_stale_write(&err), "{err}");
    let kube::Error::Api(status) = &err else {
        panic!("{err}")
    };
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on configmaps \"c\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
    assert!(classify("apply", &err).is_transient());

    // Carrying the current version, it applies.
    let mut current = config_map("c", json!({"x": "1"}));
    current["metadata"]["resourceVersion"] = json!(v1);
    let updated = api
        .patch("c", &apply(), &Patch::Apply(&current))
        .await
        .unwrap();
    let v2 = updated.metadata.resource_version.clone().unwrap();
    assert_ne!(v1, v2);

    // DeleteOptions preconditions arrive in the DELETE body.
    let delete_at = |version: &str| DeleteParams {
        preconditions: Some(Preconditions {
            uid: updated.metadata.uid.clone(),
            resource_version: Some(version.to_owned()),
        }),
        ..DeleteParams::background()
    };
    let err = api.delete("c", &delete_at(&v1)).await.unwrap_err();
    assert!(is_stale_write(&err), "{err}");
    assert!(
        err.to_string()
            .contains("Precondition failed: ResourceVersion in precondition"),
        "{err}"
    );
    api.delete("c", &delete_at(&v2)).await.unwrap();
    let codes: Vec<(String, u16)> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/configmaps/c"))
        .map(|r| (r.method, r.code))
        .collect();
    assert_eq!(
        codes,
        [
            ("PATCH".to_owned(), 201),
            ("PATCH".to_owned(), 409),
            ("PATCH".to_owned(), 200),
            ("DELETE".to_owned(), 409),
            ("DELETE".to_owned(), 200),
        ]
    );
}
