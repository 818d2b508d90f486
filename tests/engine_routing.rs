//! Two engine processes (`setpoint serve`) on one database, routed by kind: one serves the
//! KVX kind (`--kinds 'kvx.*'`), the other only the DNS plugin's kinds (`--kinds 'dns.*'`),
//! both with the same configuration file, against real peers (PostgreSQL, moto for EC2 and
//! Route 53, aiosmtpd, the Kubernetes test server).
//!
//! - Each engine claims only its own kinds (every claim event, joined with the unit's kind).
//!   Instances go through InstanceService, zones through ResourceService, both on the KVX
//!   engine's API (an engine's API serves every kind it declares, whichever it claims).
//! - With the DNS engine stopped, its units wait: nothing is parked, the KVX engine's
//!   `/metrics` shows `setpoint_units_unserved{kind=…}` > 0, `setpoint work list --unserved`
//!   lists them, while KVX work goes on; they run as soon as the DNS engine starts again.
//!
//! Nothing here asserts on speed: every wait polls for a condition (with a generous limit that
//! only guards against a hung test).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::peers::{Bearer, Peers, subjects};
use common::stack::{Api, TmpDir, client_for, full, wait_status};
use common::{EngineProcess, logged_addr, parked, setpoint, wait_for};
use serde_json::{Value, json};
use setpoint::api::proto::resource_service_client::ResourceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, CreateResourceRequest, Instance, InstanceSpec, InstanceStatus, Resource,
    UpdateInstanceRequest,
};
use sqlx::PgPool;
use tonic::service::interceptor::InterceptedService;

type Resources = ResourceServiceClient<InterceptedService<tonic::transport::Channel, Bearer>>;

const KVX_ENGINE: &str = "engine-kvx";
const DNS_ENGINE: &str = "engine-dns";

/// The configuration both engines read: the KVX adapters and the DNS plugin, on the peers.
fn write_config(dir: &Path, db_url: &str, peers: &Peers) -> PathBuf {
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            r#"
database_url = "{db_url}"

[worker]
poll_interval = "100ms"
lease = "10s"
backoff_base = "200ms"
backoff_cap = "2s"

[ec2]
region = "us-east-1"
endpoint_url = "{moto}"
default_image_id = "ami-12c6146b"

[ec2.timeouts]
poll_initial_ms = 200
poll_max_ms = 1000

[kubernetes]
access = {{ mode = "url", url = "{k8s}" }}

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "setpoint <noreply@setpoint.test>"

[plugins.dns]
region = "us-east-1"
endpoint_url = "{moto}"
"#,
            moto = peers.moto,
            k8s = peers.k8s.url(),
            smtp_port = peers.smtp_port,
        ),
    )
    .expect("config");
    config
}

/// `setpoint serve --config CONFIG --kinds KINDS` as engine `id` (see [`common::serve`]).
fn serve(config: &Path, id: &str, kinds: &str) -> EngineProcess {
    common::serve_with(config, id, &["--kinds", kinds])
}

/// GET `path` over plain HTTP/1.0: the response.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of the gauge `setpoint_units_unserved{kind="KIND"}` on `/metrics` at `addr`.
async fn unserved_gauge(addr: &str, kind: &str) -> Option<f64> {
    let addr = addr.to_owned();
    let body = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .ok()??;
    let series = format!("setpoint_units_unserved{{kind=\"{kind}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// Records the kind of every unit ever enqueued (the claim events name the unit and the
/// engine, and the unit row is gone once it finished).
async fn record_unit_kinds(pool: &PgPool) {
    for sql in [
        "CREATE TABLE test_unit_kinds (work_id bigint PRIMARY KEY, kind text NOT NULL)",
        "CREATE FUNCTION test_record_kind() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO test_unit_kinds VALUES (NEW.id, NEW.kind) ON CONFLICT DO NOTHING;
               RETURN NEW; END $$",
        "CREATE TRIGGER test_record_kind AFTER INSERT ON work
         FOR EACH ROW EXECUTE FUNCTION test_record_kind()",
    ] {
        sqlx::query(sql).execute(pool).await.expect("instrument");
    }
}

/// Claims so far: (engine, unit kind, claims).
async fn claims(pool: &PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT e.worker, k.kind, count(*) FROM work_events e
         JOIN test_unit_kinds k ON k.work_id = e.work_id
         WHERE e.event IN ('claimed', 'rescued')
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .expect("claims")
}

/// A client of the generic resource API at `server` with bearer `token`.
async fn resources(server: &str, token: &str) -> Resources {
    let channel = tonic::transport::Channel::from_shared(server.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let header = format!("Bearer {token}").parse().expect("header");
    ResourceServiceClient::with_interceptor(channel, Bearer(header))
}

/// Creates zone `domain` as resource `name` through the resource API.
async fn create_zone(api: &Resources, name: &str, domain: &str) {
    let spec = json!({
        "name": domain,
        "records": [{ "name": "www", "type": "A", "ttl": 60, "values": ["192.0.2.10"] }],
    });
    api.clone()
        .create_resource(CreateResourceRequest {
            parent: "tenants/demo".into(),
            kind: setpoint::plugins::dns::KIND.into(),
            resource_id: name.into(),
            resource: Some(Resource {
                spec: Some(setpoint::api::convert::json_to_struct(&spec)),
                ..Resource::default()
            }),
            request_id: format!("create-{name}"),
            bulk: false,
        })
        .await
        .unwrap_or_else(|e| panic!("create zone {name}: {e:?}"));
}

/// Status of resource `name` (any kind) of tenant demo.
async fn status(pool: &PgPool, name: &str) -> Option<String> {
    sqlx::query_scalar("SELECT status::text FROM instances WHERE tenant = 'demo' AND name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .expect("status")
}

async fn wait_ready(pool: &PgPool, names: &[&str]) {
    for name in names {
        wait_for(&format!("{name} to be READY"), || async move {
            (status(pool, name).await.as_deref() == Some("READY")).then_some(())
        })
        .await;
    }
}

/// The hosted zones moto's Route 53 holds, by name.
fn hosted_zones(moto: &str) -> Vec<String> {
    let script = r#"
import boto3, json, sys
r53 = boto3.client('route53', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
print(json.dumps([z['Name'] for z in r53.list_hosted_zones()['HostedZones']]))
"#;
    let out = Command::new("python3")
        .args(["-c", script, moto])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn kvx_spec(size_gb: i32) -> InstanceSpec {
    InstanceSpec {
        plan: "kvx.small".into(),
        region: "us-east-1".into(),
        size_gb,
        owner_email: "owner@example.com".into(),
    }
}

async fn create_instance(api: &Api, name: &str) {
    api.clone()
        .create_instance(CreateInstanceRequest {
            parent: "tenants/demo".into(),
            instance_id: name.into(),
            instance: Some(Instance {
                spec: Some(kvx_spec(10)),
                ..Instance::default()
            }),
            request_id: format!("create-{name}"),
            bulk: false,
        })
        .await
        .expect("create");
}

/// Checks that every claim so far was made by the engine that serves the unit's kind.
async fn check_routing(pool: &PgPool) -> Vec<(String, String, i64)> {
    let seen = claims(pool).await;
    for (engine, kind, n) in &seen {
        let own = match engine.as_str() {
            KVX_ENGINE => kind.starts_with("kvx."),
            DNS_ENGINE => kind.starts_with("dns."),
            _ => false,
        };
        assert!(own, "{engine} claimed {n} unit(s) of kind {kind}: {seen:?}");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_claim_only_their_kinds_and_unserved_units_wait() {
    let dir = TmpDir::new("routing");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let (ok, _, err) = setpoint(Some(&db.url), &["migrate"]);
    assert!(ok, "{err}");
    record_unit_kinds(&db.pool).await;
    let config = write_config(&dir, &db.url, &peers);

    let kvx = serve(&config, KVX_ENGINE, "kvx.*");
    let mut dns = serve(&config, DNS_ENGINE, "dns.*");
    let api_addr = logged_addr(&kvx, "gRPC API listening").await;
    let metrics = logged_addr(&kvx, "metrics, /healthz and /readyz listening").await;
    logged_addr(&dns, "gRPC API listening").await;
    let token = setpoint::api::auth::create_token(&db.pool, "demo", false, None)
        .await
        .expect("token");
    let api = client_for(&format!("http://{api_addr}"), &token.token).await;
    let zones = resources(&format!("http://{api_addr}"), &token.token).await;

    // What each engine registered: only the work kinds its patterns match.
    let registered: Vec<(String, Vec<String>)> =
        sqlx::query_as("SELECT id, kinds FROM engines ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("engines");
    assert_eq!(registered.len(), 2, "{registered:?}");
    for (id, kinds) in &registered {
        let prefix = if id == KVX_ENGINE { "kvx." } else { "dns." };
        assert!(
            !kinds.is_empty() && kinds.iter().all(|k| k.starts_with(prefix)),
            "{id} serves {kinds:?}"
        );
    }
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "list", "--unserved"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("no unit waits for an engine"), "{out}");

    // Both running: KVX instances and DNS zones at once, each claimed by its own engine.
    for name in ["db-1", "db-2"] {
        create_instance(&api, name).await;
    }
    create_zone(&zones, "zone-1", "one.example.com").await;
    create_zone(&zones, "zone-2", "two.example.com").await;
    wait_ready(&db.pool, &["zone-1", "zone-2"]).await;
    wait_status(&api, "db-1", InstanceStatus::Ready, 1).await;
    wait_status(&api, "db-2", InstanceStatus::Ready, 1).await;
    let seen = check_routing(&db.pool).await;
    assert!(
        seen.iter().any(|(e, ..)| e == KVX_ENGINE) && seen.iter().any(|(e, ..)| e == DNS_ENGINE),
        "both engines worked: {seen:?}"
    );
    eprintln!("claims with both engines up: {seen:?}");

    // The DNS engine stops (SIGTERM: it marks itself stopped). Its units wait, visibly; KVX
    // work goes on.
    dns.signal("TERM");
    assert!(dns.wait_exit().await, "{}", dns.output());
    drop(dns);
    create_zone(&zones, "zone-3", "three.example.com").await;
    create_zone(&zones, "zone-4", "four.example.com").await;
    api.clone()
        .update_instance(UpdateInstanceRequest {
            instance: Some(Instance {
                name: full("db-1"),
                spec: Some(kvx_spec(20)),
                ..Instance::default()
            }),
            update_mask: None,
            request_id: "grow-db-1".into(),
            bulk: false,
        })
        .await
        .expect("update db-1");
    wait_status(&api, "db-1", InstanceStatus::Ready, 2).await;
    let first_step = "dns.zone.create.zone";
    let gauge = wait_for("the unserved gauge of the zones' first step", || {
        let metrics = metrics.clone();
        async move {
            unserved_gauge(&metrics, first_step)
                .await
                .filter(|v| *v >= 2.0)
        }
    })
    .await;
    assert_eq!(gauge, 2.0, "two zones wait");
    for zone in ["zone-3", "zone-4"] {
        assert_eq!(status(&db.pool, zone).await.as_deref(), Some("CREATING"));
    }
    assert_eq!(parked(&db.pool).await, 0, "nothing parked");
    let waiting: Vec<(String, Option<String>, i32)> = sqlx::query_as(
        "SELECT kind, lease_owner, attempt FROM work WHERE kind LIKE 'dns.%' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("work");
    assert_eq!(
        waiting,
        vec![
            (first_step.to_owned(), None, 0),
            (first_step.to_owned(), None, 0)
        ],
        "the zones' units wait, never claimed"
    );
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "list", "--unserved"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("2 unit(s) wait") && out.matches(first_step).count() >= 3,
        "the kind with its count, and both units: {out}"
    );
    let (ok, out, err) = setpoint(Some(&db.url), &["work", "list", "--unserved", "--json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed["kinds"], json!([{ "kind": first_step, "units": 2 }]));
    assert_eq!(
        listed["units"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let hosted = tokio::task::spawn_blocking({
        let moto = peers.moto.clone();
        move || hosted_zones(&moto)
    })
    .await
    .expect("join");
    assert!(
        !hosted
            .iter()
            .any(|z| z.starts_with("three.") || z.starts_with("four.")),
        "no zone made while no engine serves DNS: {hosted:?}"
    );
    check_routing(&db.pool).await;

    // The DNS engine starts again: the waiting zones are made.
    let dns = serve(&config, DNS_ENGINE, "dns.*");
    wait_ready(&db.pool, &["zone-3", "zone-4"]).await;
    let hosted = tokio::task::spawn_blocking({
        let moto = peers.moto.clone();
        move || hosted_zones(&moto)
    })
    .await
    .expect("join");
    for domain in ["one", "two", "three", "four"] {
        assert_eq!(
            hosted
                .iter()
                .filter(|z| **z == format!("{domain}.example.com."))
                .count(),
            1,
            "one zone {domain}.example.com: {hosted:?}"
        );
    }
    assert_eq!(parked(&db.pool).await, 0, "nothing parked");
    let seen = check_routing(&db.pool).await;
    eprintln!("claims at the end: {seen:?}");
    wait_for("the unserved gauge back at 0", || {
        let metrics = metrics.clone();
        async move {
            unserved_gauge(&metrics, first_step)
                .await
                .filter(|v| *v == 0.0)
        }
    })
    .await;
    let (ok, out, _) = setpoint(Some(&db.url), &["work", "list", "--unserved"]);
    assert!(
        ok && out.starts_with("no unit waits for an engine"),
        "{out}"
    );
    // The ops alert reads the gauge this test finds on /metrics.
    let alerts = std::fs::read_to_string(common::package_dir().join("ops/prometheus-alerts.yml"))
        .expect("alerts");
    assert!(
        alerts.contains("setpoint_units_unserved"),
        "an alert rule reads the gauge"
    );
    assert!(
        subjects(&peers.maildir).iter().any(|s| s.contains("db-1")),
        "the KVX engine mailed"
    );
    drop(dns);
    drop(kvx);
    drop(peers);
}
