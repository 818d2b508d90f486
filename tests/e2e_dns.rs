//! Generic resources end to end on the dev stack (`setpoint dev` as a child process with real
//! moto — EC2 and Route 53 —, aiosmtpd and PostgreSQL): a `dns.zone` driven through grpcurl,
//! a Python client generated from `proto/` and the Rust client, beside a KVX instance of the
//! same name; tenant isolation and tokens limited to kinds; credentials that only their tenant
//! reads and that never reach a log; bad specs refused with every violation and nothing
//! written; the engine killed at each step of the DNS chains; a delete during a KVX create.
//!
//! moto creates a second hosted zone when `CreateHostedZone` is repeated with the same
//! `CallerReference`, where AWS refuses: these tests count zones, so they prove that a retried
//! create finds the zone of the killed attempt (by `ListHostedZones`) instead of relying on AWS.
//!
//! Nothing here asserts on speed: every wait polls for a condition with a generous limit.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::peers::{Bearer, Peers, free_port, python_json, start_dev, test_dir};
use serde_json::{Value, json};
use setpoint::api::convert::{json_to_struct, struct_to_json};
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::resource_service_client::ResourceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, CreateResourceRequest, DeleteResourceRequest,
    GetConnectionDetailsRequest, GetInstanceRequest, GetResourceRequest, Instance, InstanceSpec,
    ListKindsRequest, ListResourcesRequest, Resource, ResourceStatus,
    RotateInstanceCredentialsRequest, UpdateResourceRequest,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Rs = ResourceServiceClient<InterceptedService<Channel, Bearer>>;
type Is = InstanceServiceClient<InterceptedService<Channel, Bearer>>;

async fn channel(info: &Value) -> Channel {
    Channel::from_shared(info["server"].as_str().expect("server").to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

fn bearer(token: &str) -> Bearer {
    Bearer(format!("Bearer {token}").parse().expect("header"))
}

async fn resources(info: &Value, token: &str) -> Rs {
    ResourceServiceClient::with_interceptor(channel(info).await, bearer(token))
}

async fn instances(info: &Value, token: &str) -> Is {
    InstanceServiceClient::with_interceptor(channel(info).await, bearer(token))
}

fn tenant_token(info: &Value) -> String {
    info["tenant_token"].as_str().expect("token").to_owned()
}

/// A token made with `setpoint tokens create` against the dev stack's database.
fn make_token(info: &Value, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_setpoint"))
        .args(["tokens", "create", "--database-url"])
        .arg(info["database_url"].as_str().expect("database url"))
        .args(args)
        .output()
        .expect("setpoint tokens create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The zones moto holds: zone name → one entry per hosted zone of that name (so a duplicate
/// shows), each the zone's records other than NS, SOA and setpoint's ownership records,
/// sorted.
fn zones(endpoint: &str) -> BTreeMap<String, Vec<Vec<Value>>> {
    let script = r#"
import boto3, json, sys
r53 = boto3.client('route53', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = {}
for page in r53.get_paginator('list_hosted_zones').paginate():
    for z in page['HostedZones']:
        recs = []
        for p in r53.get_paginator('list_resource_record_sets').paginate(HostedZoneId=z['Id']):
            for rr in p['ResourceRecordSets']:
                # The zone's own, and setpoint's ownership records (`_setpoint-…` TXT).
                if rr['Type'] in ('NS', 'SOA') or rr['Name'].startswith('_setpoint-'):
                    continue
                recs.append({'name': rr['Name'], 'type': rr['Type'], 'ttl': rr.get('TTL'),
                             'values': sorted(v['Value'] for v in rr.get('ResourceRecords', []))})
        recs.sort(key=lambda r: (r['name'], r['type']))
        out.setdefault(z['Name'], []).append(recs)
print(json.dumps(out))
"#;
    serde_json::from_value(python_json(script, &[endpoint])).expect("zones")
}

fn grpcurl(info: &Value, token: &str, method: &str, body: &Value) -> (bool, String, String) {
    let server = info["server"]
        .as_str()
        .expect("server")
        .trim_start_matches("http://")
        .to_owned();
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .arg("-d")
        .arg(body.to_string())
        .arg(server)
        .arg(method)
        .output()
        .expect("grpcurl (scripts/install-deps.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn get(rs: &mut Rs, name: &str) -> Result<Resource, tonic::Status> {
    rs.get_resource(GetResourceRequest {
        name: name.to_owned(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Waits until `name` is READY with no work left, at `generation` at least.
async fn ready(rs: &Rs, name: &str, generation: i64) -> Resource {
    common::wait_for(&format!("{name} READY at generation {generation}"), || {
        let mut rs = rs.clone();
        async move {
            get(&mut rs, name).await.ok().filter(|r| {
                r.status == ResourceStatus::Ready as i32
                    && !r.has_active_work
                    && r.observed_generation >= generation
            })
        }
    })
    .await
}

/// Waits until `name` is gone (NOT_FOUND).
async fn gone(rs: &Rs, name: &str) {
    common::wait_for(&format!("{name} to be gone"), || {
        let mut rs = rs.clone();
        async move {
            match get(&mut rs, name).await {
                Err(s) if s.code() == Code::NotFound => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

fn zone_spec(domain: &str) -> Value {
    json!({
        "name": domain,
        "comment": "e2e",
        "records": [
            {"name": "www", "type": "A", "ttl": 300, "values": ["192.0.2.10"]},
            {"name": "@", "type": "TXT", "ttl": 300, "values": ["hello"]}
        ]
    })
}

async fn create_zone(rs: &mut Rs, name: &str, domain: &str) -> Result<Resource, tonic::Status> {
    rs.create_resource(CreateResourceRequest {
        parent: String::new(),
        kind: "dns.zone".into(),
        resource_id: name.into(),
        resource: Some(Resource {
            spec: Some(json_to_struct(&zone_spec(domain))),
            ..Resource::default()
        }),
        request_id: format!("create-{name}"),
        bulk: false,
    })
    .await
    .map(tonic::Response::into_inner)
}

fn kvx_spec() -> InstanceSpec {
    InstanceSpec {
        plan: "kvx.small".into(),
        region: "us-east-1".into(),
        size_gb: 10,
        owner_email: "owner@example.com".into(),
    }
}

async fn password_of(rs: &mut Rs, name: &str) -> String {
    let d = rs
        .get_connection_details(GetConnectionDetailsRequest {
            name: name.to_owned(),
        })
        .await
        .expect("connection details")
        .into_inner();
    struct_to_json(&d.details.expect("details"))["cluster"]["password"]
        .as_str()
        .expect("a password")
        .to_owned()
}

/// The base64 values of the Kubernetes Secret of KVX instance `uid` of tenant `demo`.
fn secret_values(k8s: &str, uid: &str) -> Vec<String> {
    let ns = setpoint_kubernetes::names::namespace_name("demo");
    let name = setpoint_kubernetes::names::object_name(uid.parse().expect("uuid"));
    let script = r#"
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1]) as r:
    print(json.dumps(list(json.load(r).get('data', {}).values())))
"#;
    let url = format!("{k8s}/api/v1/namespaces/{ns}/secrets/{name}");
    serde_json::from_value(python_json(script, &[&url])).expect("values")
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_lives_and_dies_beside_an_instance_of_the_same_name() {
    let dir = test_dir("e2e-dns");
    let (engine, info) = start_dev(&dir, &[], &[]).await;
    let moto = info["ec2_endpoint"].as_str().expect("moto").to_owned();
    let token = tenant_token(&info);

    // grpcurl, through reflection: the kinds with their schemas, then a zone.
    let (ok, out, err) = grpcurl(
        &info,
        &token,
        "setpoint.v1.ResourceService/ListKinds",
        &json!({}),
    );
    assert!(ok, "{err}");
    let kinds: Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = kinds["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["dns.zone", "kvx.instance"], "{out}");
    assert_eq!(
        kinds["kinds"][0]["schema"]["properties"]["records"]["type"], "array",
        "{out}"
    );
    let (ok, out, err) = grpcurl(
        &info,
        &token,
        "setpoint.v1.ResourceService/CreateResource",
        &json!({
            "kind": "dns.zone",
            "resource_id": "shop",
            "resource": {"spec": zone_spec("shop.example.com")},
            "request_id": "create-shop-zone"
        }),
    );
    assert!(ok, "{err}");
    assert!(out.contains("RESOURCE_STATUS_CREATING"), "{out}");
    let mut rs = resources(&info, &token).await;
    let zone = ready(&rs, "tenants/demo/zones/shop", 1).await;
    let observed = struct_to_json(zone.observed.as_ref().expect("observed"));
    assert!(
        observed["zone"]["id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{observed}"
    );
    let z = zones(&moto);
    assert_eq!(
        z.get("shop.example.com.").map(Vec::len),
        Some(1),
        "exactly one zone: {z:?}"
    );
    assert_eq!(
        json!(z["shop.example.com."][0]),
        json!([
            {"name": "shop.example.com.", "type": "TXT", "ttl": 300, "values": ["\"hello\""]},
            {"name": "www.shop.example.com.", "type": "A", "ttl": 300, "values": ["192.0.2.10"]}
        ])
    );

    // A KVX instance of the same name, in the same tenant.
    let mut is = instances(&info, &token).await;
    is.create_instance(CreateInstanceRequest {
        parent: String::new(),
        instance_id: "shop".into(),
        instance: Some(Instance {
            spec: Some(kvx_spec()),
            ..Instance::default()
        }),
        request_id: "create-shop-instance".into(),
        bulk: false,
    })
    .await
    .expect("the instance is created beside the zone");
    let instance = ready(&rs, "tenants/demo/instances/shop", 1).await;
    assert_eq!(instance.kind, "kvx.instance");
    let password = password_of(&mut rs, "tenants/-/instances/shop").await;

    // The Python client changes the zone's records, reads connection details, deletes it.
    let root = common::package_dir();
    let gen_dir = dir.join("pygen");
    std::fs::create_dir_all(&gen_dir).expect("gen dir");
    let out = Command::new("python3")
        .current_dir(&root)
        .args(["-m", "grpc_tools.protoc", "-Iproto"])
        .arg(format!("--python_out={}", gen_dir.display()))
        .arg(format!("--grpc_python_out={}", gen_dir.display()))
        .args([
            "proto/setpoint/v1/instances.proto",
            "proto/setpoint/v1/work.proto",
            "proto/setpoint/v1/resources.proto",
        ])
        .output()
        .expect("grpcio-tools");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = info["server"]
        .as_str()
        .expect("server")
        .trim_start_matches("http://")
        .to_owned();
    let script = root.join("tests/python/resource_client.py");
    let (gen_arg, tok) = (gen_dir.display().to_string(), token.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args([gen_arg, addr, tok, "shop".into(), "shop".into()])
            .output()
            .expect("python3")
    })
    .await
    .expect("python");
    assert!(
        out.status.success(),
        "python client:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(said["password"], password.as_str());
    gone(&rs, "tenants/demo/zones/shop").await;
    let z = zones(&moto);
    assert!(!z.contains_key("shop.example.com."), "zone left: {z:?}");

    // Another tenant sees neither; a token limited to dns.* cannot touch instances.
    let other = make_token(&info, &["--tenant", "other"]);
    let mut rs_other = resources(&info, &other).await;
    for name in ["tenants/demo/instances/shop", "tenants/-/instances/shop"] {
        let e = get(&mut rs_other, name).await.expect_err("hidden");
        assert_eq!(e.code(), Code::NotFound, "{name}: {e:?}");
        let e = rs_other
            .get_connection_details(GetConnectionDetailsRequest { name: name.into() })
            .await
            .expect_err("hidden");
        assert_eq!(e.code(), Code::NotFound, "{name}: {e:?}");
    }
    let listed = rs_other
        .list_resources(ListResourcesRequest {
            kind: "kvx.instance".into(),
            ..ListResourcesRequest::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(listed.resources.is_empty(), "{listed:?}");
    let dns_only = make_token(&info, &["--tenant", "demo", "--kinds", "dns.*"]);
    let mut rs_dns = resources(&info, &dns_only).await;
    let kinds = rs_dns
        .list_kinds(ListKindsRequest {})
        .await
        .expect("kinds")
        .into_inner();
    let names: Vec<String> = kinds.kinds.iter().map(|k| k.name.clone()).collect();
    assert_eq!(names, ["dns.zone"]);
    let e = rs_dns
        .create_resource(CreateResourceRequest {
            kind: "kvx.instance".into(),
            resource_id: "nope".into(),
            resource: Some(Resource {
                spec: Some(json_to_struct(&json!({
                    "plan": "kvx.small", "region": "us-east-1", "size_gb": 10,
                    "owner_email": "a@example.com"
                }))),
                ..Resource::default()
            }),
            request_id: "kvx-through-a-dns-token".into(),
            ..CreateResourceRequest::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = get(&mut rs_dns, "tenants/demo/instances/shop")
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mut is_dns = instances(&info, &dns_only).await;
    let e = is_dns
        .get_instance(GetInstanceRequest {
            name: "tenants/demo/instances/shop".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Credentials: never in Get, List or the log; rotated on request, into the Secret too.
    let shown = format!(
        "{:?}{:?}",
        get(&mut rs, "tenants/demo/instances/shop")
            .await
            .expect("get"),
        is.get_instance(GetInstanceRequest {
            name: "tenants/demo/instances/shop".into()
        })
        .await
        .expect("get")
        .into_inner()
    );
    assert!(!shown.contains(&password), "the password is shown: {shown}");
    assert!(
        secret_values(info["kubernetes_url"].as_str().expect("k8s"), &instance.uid)
            .contains(&b64(&password)),
        "the Secret holds the password"
    );
    let rotated = is
        .rotate_instance_credentials(RotateInstanceCredentialsRequest {
            name: "tenants/-/instances/shop".into(),
            request_id: "rotate-shop".into(),
        })
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(rotated.generation, 1, "a rotation is no new generation");
    common::wait_for("the new credentials", || {
        let mut rs = rs.clone();
        let old = password.clone();
        async move {
            let r = get(&mut rs, "tenants/demo/instances/shop").await.ok()?;
            if r.status != ResourceStatus::Ready as i32 || r.has_active_work {
                return None;
            }
            let new = password_of(&mut rs, "tenants/demo/instances/shop").await;
            (new != old).then_some(())
        }
    })
    .await;
    let new_password = password_of(&mut rs, "tenants/demo/instances/shop").await;
    let values = secret_values(info["kubernetes_url"].as_str().expect("k8s"), &instance.uid);
    assert!(
        values.contains(&b64(&new_password)),
        "the Secret holds the new password"
    );
    assert!(
        !values.contains(&b64(&password)),
        "the old password is gone"
    );
    drop(engine);
    let log = std::fs::read_to_string(dir.join("dev.log")).expect("log");
    for secret in [&password, &new_password] {
        assert!(!log.contains(secret.as_str()), "a password reached the log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Counts of the rows a refused request must not write.
async fn rows(pool: &sqlx::PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM work),
                (SELECT count(*) FROM api_requests)",
    )
    .fetch_one(pool)
    .await
    .expect("counts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_with_every_violation_and_nothing_written() {
    let dir = test_dir("e2e-dns-bad");
    let (engine, info) = start_dev(&dir, &[], &[]).await;
    let pool = setpoint::store::connect(info["database_url"].as_str().expect("url"), 2)
        .await
        .expect("db");
    let mut rs = resources(&info, &tenant_token(&info)).await;
    create_zone(&mut rs, "good", "good.example.com")
        .await
        .expect("a good zone");
    ready(&rs, "tenants/demo/zones/good", 1).await;
    let before = rows(&pool).await;

    let create = |spec: Value| CreateResourceRequest {
        kind: "dns.zone".into(),
        resource_id: "bad".into(),
        resource: Some(Resource {
            spec: Some(json_to_struct(&spec)),
            ..Resource::default()
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
        ..CreateResourceRequest::default()
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        // Wrong type, unknown field, missing field in a record, a value out of its enum: all
        // at once.
        (
            json!({"name": 5, "colour": "blue",
                   "records": [{"name": "a", "type": "Q", "values": ["x"]}, {"type": "A", "values": ["192.0.2.1"]}]}),
            vec![
                "resource.spec.colour",
                "resource.spec.name",
                "resource.spec.records[0].type",
                "resource.spec.records[1].name",
            ],
        ),
        // A required field missing.
        (json!({"comment": "no name"}), vec!["resource.spec.name"]),
        // Oversized values: one string too long, and a spec over the size limit.
        (json!({"name": "x".repeat(300)}), vec!["resource.spec.name"]),
        (
            json!({"name": "big.example.com",
                   "records": [{"name": "r", "type": "TXT",
                       "values": (0..101).map(|i| format!("v{i}")).collect::<Vec<_>>()}]}),
            vec!["resource.spec.records[0].values"],
        ),
        // A control character.
        (
            json!({"name": "nul\u{0}.example.com"}),
            vec!["resource.spec.name"],
        ),
        // The adapter's own rules (checked by the kind): an A record that is no address.
        (
            json!({"name": "rules.example.com",
                   "records": [{"name": "www", "type": "A", "values": ["not-an-ip"]}]}),
            vec!["records[0].values[0]"],
        ),
    ];
    for (spec, fields) in cases {
        let e = rs
            .create_resource(create(spec.clone()))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let details = tonic_types::StatusExt::get_error_details(&e);
        let got: Vec<String> = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        for f in &fields {
            assert!(
                got.iter().any(|g| g.contains(f)),
                "{f} not named in {got:?} ({})",
                e.message()
            );
        }
        assert_eq!(rows(&pool).await, before, "a refused create wrote rows");
    }

    // An immutable field changed, and an unknown field, on update: both named.
    let e = rs
        .update_resource(UpdateResourceRequest {
            resource: Some(Resource {
                name: "tenants/demo/zones/good".into(),
                spec: Some(json_to_struct(
                    &json!({"name": "moved.example.com", "ttl": 5}),
                )),
                ..Resource::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["spec.name".into(), "spec.ttl".into()],
            }),
            request_id: uuid::Uuid::new_v4().to_string(),
            bulk: false,
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("resource.spec.name"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("resource.spec.ttl"), "{}", e.message());
    assert_eq!(rows(&pool).await, before, "a refused update wrote rows");
    let zone = get(&mut rs, "tenants/demo/zones/good").await.expect("zone");
    assert_eq!(zone.generation, 1);

    // Unknown kinds and collections are named too.
    let mut unknown = create(json!({"name": "a.example.com"}));
    unknown.kind = "dns.nope".into();
    let e = rs.create_resource(unknown).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = get(&mut rs, "tenants/demo/buckets/x")
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(rows(&pool).await, before);
    pool.close().await;
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Flags of a dev engine on an external database and peers, so that it can be killed and
/// started again on the same state.
fn external(db: &str, peers: &Peers, api_port: u16) -> Vec<String> {
    [
        "--database-url",
        db,
        "--ec2-endpoint",
        &peers.moto,
        "--smtp",
        &peers.smtp,
        "--kubernetes-url",
        &peers.k8s.url(),
        "--lease",
        "2s",
        "--poll-interval",
        "100ms",
        "--listen",
        &format!("127.0.0.1:{api_port}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

async fn wait_marker(log: &Path, point: &str) {
    let marker = setpoint_adapter::failpoint::marker(point);
    common::wait_for(&format!("the engine to reach {point}"), || {
        let marker = marker.clone();
        async move {
            std::fs::read_to_string(log)
                .ok()
                .filter(|l| l.contains(&marker))
                .map(|_| ())
        }
    })
    .await;
}

/// The engine killed (SIGKILL) at each step of the DNS chains: right after `CreateHostedZone`
/// returned (the zone exists, untagged, recorded nowhere), after the zone step and after the
/// records step finished but before their completion committed, and after the delete step.
/// Each time the engine started again finishes the chain with exactly one zone (none after
/// the delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_at_each_dns_step_leaves_exactly_one_zone() {
    let dir = test_dir("e2e-dns-kill");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let flags = external(&db.url, &peers, free_port());
    let log = dir.join("dev.log");
    for (i, point) in [
        "route53.after-create-zone",
        "worker.before-complete:dns.zone.create.zone",
        "worker.before-complete:dns.zone.create.records",
    ]
    .into_iter()
    .enumerate()
    {
        let (engine, info) = start_dev(&dir, &flags, &[("SETPOINT_FAILPOINTS", point)]).await;
        let mut rs = resources(&info, &tenant_token(&info)).await;
        let name = format!("fp-{i}");
        let domain = format!("fp-{i}.example.com");
        create_zone(&mut rs, &name, &domain).await.expect("create");
        wait_marker(&log, point).await;
        drop(engine);
        let _ = std::fs::write(&log, "");
        let (engine, info) = start_dev(&dir, &flags, &[]).await;
        let rs = resources(&info, &tenant_token(&info)).await;
        let zone = ready(&rs, &format!("tenants/demo/zones/{name}"), 1).await;
        let z = zones(&peers.moto);
        let mine = z.get(&format!("{domain}.")).cloned().unwrap_or_default();
        assert_eq!(mine.len(), 1, "{point}: zones named {domain}: {z:?}");
        assert_eq!(mine[0].len(), 2, "{point}: records: {mine:?}");
        let observed = struct_to_json(zone.observed.as_ref().expect("observed"));
        assert!(
            observed["zone"]["id"].as_str().is_some(),
            "{point}: {observed}"
        );
        drop(engine);
    }

    // The delete step: killed after it finished, before its completion; the next engine
    // finishes the chain (the delete runs again and finds nothing left).
    let point = "worker.before-complete:dns.zone.delete";
    let (engine, info) = start_dev(&dir, &flags, &[("SETPOINT_FAILPOINTS", point)]).await;
    let mut rs = resources(&info, &tenant_token(&info)).await;
    rs.delete_resource(DeleteResourceRequest {
        name: "tenants/demo/zones/fp-0".into(),
        request_id: "delete-fp-0".into(),
        bulk: false,
    })
    .await
    .expect("delete");
    wait_marker(&log, point).await;
    drop(engine);
    let _ = std::fs::write(&log, "");
    let (engine, info) = start_dev(&dir, &flags, &[]).await;
    let rs = resources(&info, &tenant_token(&info)).await;
    gone(&rs, "tenants/demo/zones/fp-0").await;
    let z = zones(&peers.moto);
    assert!(!z.contains_key("fp-0.example.com."), "{z:?}");
    assert_eq!(z.len(), 2, "the other zones stay: {z:?}");
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

/// EC2 instances moto holds for setpoint resource `uid`, by state.
fn machines_of(endpoint: &str, uid: &str) -> Vec<String> {
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = []
for page in ec2.get_paginator('describe_instances').paginate(
        Filters=[{'Name': 'tag:setpoint:instance-id', 'Values': [sys.argv[2]]}]):
    for r in page['Reservations']:
        for i in r['Instances']:
            out.append(i['State']['Name'])
print(json.dumps(out))
"#;
    serde_json::from_value(python_json(script, &[endpoint, uid])).expect("machines")
}

/// A delete while the create's first step (the machine) runs: the chain is superseded, the
/// delete runs after that step's attempt, and nothing is left: no running machine, no
/// Kubernetes objects, the instance DELETED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_kvx_create_leaves_nothing() {
    let dir = test_dir("e2e-dns-supersede");
    let (engine, info) = start_dev(&dir, &[], &[]).await;
    let moto = info["ec2_endpoint"].as_str().expect("moto").to_owned();
    let pool = setpoint::store::connect(info["database_url"].as_str().expect("url"), 2)
        .await
        .expect("db");
    let token = tenant_token(&info);
    let mut is = instances(&info, &token).await;
    let created = is
        .create_instance(CreateInstanceRequest {
            instance_id: "brief".into(),
            instance: Some(Instance {
                spec: Some(kvx_spec()),
                ..Instance::default()
            }),
            request_id: "create-brief".into(),
            ..CreateInstanceRequest::default()
        })
        .await
        .expect("create")
        .into_inner();
    // Delete as soon as the machine step has launched the machine: the create is in flight
    // (moto's machines run at once, so the chain may be one step further by then).
    common::wait_for("the machine step to launch the machine", || {
        let moto = moto.clone();
        let uid = created.uid.clone();
        async move { (!machines_of(&moto, &uid).is_empty()).then_some(()) }
    })
    .await;
    let rs = resources(&info, &token).await;
    rs.clone()
        .delete_resource(DeleteResourceRequest {
            name: "tenants/demo/instances/brief".into(),
            request_id: "delete-brief".into(),
            bulk: false,
        })
        .await
        .expect("a delete is accepted while the create runs");
    gone(&rs, "tenants/demo/instances/brief").await;
    let states = machines_of(&moto, &created.uid);
    assert!(
        states
            .iter()
            .all(|s| s == "terminated" || s == "shutting-down"),
        "machines left: {states:?}"
    );
    let k8s = info["kubernetes_url"].as_str().expect("k8s");
    let ns = setpoint_kubernetes::names::namespace_name("demo");
    let name = setpoint_kubernetes::names::object_name(created.uid.parse().expect("uuid"));
    let script = r#"
import json, sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1])
    print(json.dumps(True))
except urllib.error.HTTPError as e:
    print(json.dumps(e.code != 404))
"#;
    for kind in ["secrets", "services", "configmaps"] {
        let url = format!("{k8s}/api/v1/namespaces/{ns}/{kind}/{name}");
        assert_eq!(
            python_json(script, &[&url]),
            json!(false),
            "{kind} {name} is left"
        );
    }
    let status: String = sqlx::query_scalar("SELECT status FROM instances WHERE id = $1")
        .bind(created.uid.parse::<uuid::Uuid>().expect("uid"))
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(status, "DELETED");
    pool.close().await;
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `setpoint dev` prints under "Try" runs as written, in a shell that has only the
/// system's PATH: the commands create an instance and a zone, both end READY, and the
/// operators' commands read the queue and the budgets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_try_lines_work_as_written() {
    let dir = test_dir("e2e-dev-try");
    let (engine, _info) = start_dev(&dir, &[], &[]).await;
    let log = std::fs::read_to_string(dir.join("dev.log")).expect("log");
    let block: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("Try"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert!(block.len() >= 4, "no Try block in:\n{log}");
    let script = format!("set -euo pipefail\n{}\n", block.join("\n"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env_remove("SETPOINT_SERVER")
            .env_remove("SETPOINT_TOKEN")
            .env_remove("SETPOINT_DATABASE_URL")
            .output()
            .expect("bash")
    })
    .await
    .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Try lines failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tenants/demo/instances/db-1  READY"),
        "{stdout}"
    );
    assert!(stdout.contains("tenants/demo/zones/shop"), "{stdout}");
    // The operators' line reads PostgreSQL: the queue (empty by now) and the budgets the
    // creates drew from.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("ID ") && l.contains("KIND") && l.contains("TOKEN")),
        "{stdout}"
    );
    assert!(
        stdout.contains("ec2/") && stdout.contains("/us-east-1/describe"),
        "{stdout}"
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
