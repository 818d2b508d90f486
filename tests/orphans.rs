//! The orphan sweep against a real moto server and PostgreSQL (issue 16, item 7): managed
//! machines that belong to no live resource are reported, listed by `setpoint work orphans`
//! and exported as a metric; terminated only when configured, only once old enough, only within
//! the limit, and never when their resource has a row in any state.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{InstanceType, ResourceType, Tag, TagSpecification};
use common::peers::{Proc, free_port, spawn, test_dir, wait_port};
use setpoint::config::FileConfig;
use setpoint::engine::EngineBuilder;
use setpoint::plugins::ec2::{Ec2Plugin, Ec2Settings};
use setpoint::plugins::orphans::{OrphanConfig, OrphanSweep, SweepReport};
use setpoint_adapter::{Compute, Fence, IdempotencyToken, InstanceRequest};
use setpoint_ec2::{Ec2Compute, Ec2Config, Ec2Regions, TAG_MANAGED};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const REGION: &str = "eu-west-1";

/// The region of the extra-machines test: the gauge `setpoint_orphan_machines{region}` is
/// global to the test binary, so that test sweeps a region no other test asserts on.
const EXTRA_REGION: &str = "eu-west-3";

fn ec2_config(endpoint: &str) -> Ec2Config {
    ec2_config_in(endpoint, REGION)
}

fn ec2_config_in(endpoint: &str, region: &str) -> Ec2Config {
    let mut c = Ec2Config::new(region);
    c.endpoint_url = Some(endpoint.to_owned());
    c.default_image_id = Some("ami-12c6146b".into());
    c.timeouts.poll_initial_ms = 50;
    c.timeouts.poll_max_ms = 200;
    c
}

fn credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "tests")
}

async fn compute(endpoint: &str) -> Arc<Ec2Compute> {
    compute_in(endpoint, REGION).await
}

async fn compute_in(endpoint: &str, region: &str) -> Arc<Ec2Compute> {
    let config = ec2_config_in(endpoint, region);
    let client = config
        .client_with_credentials(credentials())
        .await
        .expect("client");
    Arc::new(Ec2Compute::from_client(client, config))
}

/// Launches a machine the way setpoint does (managed, with resource, token and tenant tags)
/// for `resource`, whether or not the database knows it.
async fn launch(ec2: &Ec2Compute, resource: Uuid) -> String {
    let req = InstanceRequest {
        resource_id: resource,
        tenant: "acme".into(),
        plan: "kvx.small".into(),
        name: None,
        image_id: None,
        instance_type: None,
        subnet_id: None,
        data_volume_gb: None,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    ec2.ensure_instance(
        &IdempotencyToken::generate(),
        &req,
        deadline,
        &Fence::unbounded(),
    )
    .await
    .expect("launch")
    .instance_id
}

/// Launches a machine tagged managed but with no resource tag.
async fn launch_untagged(ec2: &Ec2Compute) -> String {
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .tags(Tag::builder().key(TAG_MANAGED).value("true").build())
        .build();
    let out = ec2
        .client()
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags)
        .send()
        .await
        .expect("run instances");
    out.instances()[0].instance_id().expect("id").to_owned()
}

/// States of the given machines in moto, by id.
async fn states(ec2: &Ec2Compute, ids: &[&str]) -> BTreeMap<String, String> {
    let out = ec2
        .client()
        .describe_instances()
        .set_instance_ids(Some(ids.iter().map(|s| (*s).to_owned()).collect()))
        .send()
        .await
        .expect("describe");
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap_or_default().to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// An instance row of kind `kvx.instance`, deleted when `deleted`.
async fn resource(pool: &PgPool, name: &str, deleted: bool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO instances (id, tenant, name, spec, status, deleted_at)
         VALUES ($1, 'acme', $2, '{}', CASE WHEN $3 THEN 'DELETED' ELSE 'READY' END,
                 CASE WHEN $3 THEN now() END)",
    )
    .bind(id)
    .bind(name)
    .bind(deleted)
    .execute(pool)
    .await
    .expect("instance");
    id
}

/// A test database with the sweep's tables, which an engine's EC2 plugin migrates at start.
async fn db_with_orphan_tables() -> setpoint::dev::testdb::TestDb {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    for m in setpoint::plugins::orphans::store::migrations() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql))
            .execute(&db.pool)
            .await
            .expect("the sweep's tables");
    }
    db
}

fn sweep(pool: &PgPool, ec2: &Arc<Ec2Compute>, config: OrphanConfig) -> OrphanSweep {
    sweep_in(pool, ec2, config, REGION)
}

fn sweep_in(
    pool: &PgPool,
    ec2: &Arc<Ec2Compute>,
    config: OrphanConfig,
    region: &str,
) -> OrphanSweep {
    let computes: BTreeMap<String, Arc<dyn Compute>> =
        BTreeMap::from([(region.to_owned(), ec2.clone() as Arc<dyn Compute>)]);
    OrphanSweep::new(pool.clone(), computes, config).expect("sweep")
}

/// (machine, reason, action) of each orphan a sweep recorded.
fn found(report: &SweepReport) -> BTreeSet<(String, String, String)> {
    report
        .regions
        .iter()
        .flat_map(|r| &r.orphans)
        .map(|o| (o.instance_id.clone(), o.reason.clone(), o.action.clone()))
        .collect()
}

fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

/// A machine launched with the managed tag for a resource the database never had is reported,
/// listed and counted; it is terminated only with `terminate = true`, once older than
/// `min_age`, and only while the sweep would terminate no more than `max_terminations`. The
/// machines of a live resource, of a tombstone and one without a resource tag are never
/// terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reported_then_terminated_only_when_configured() {
    let dir = test_dir("orphans");
    let port = free_port();
    let _moto: Proc = spawn(
        &format!("exec python3 -m moto.server -H 127.0.0.1 -p {port}"),
        &dir.join("moto.log"),
    );
    wait_port(port).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let db = db_with_orphan_tables().await;
    let ec2 = compute(&endpoint).await;
    let handle = setpoint::metrics::install().expect("recorder");

    let live = resource(&db.pool, "live", false).await;
    let tomb = resource(&db.pool, "tomb", true).await;
    let live_machine = launch(&ec2, live).await;
    let tomb_machine = launch(&ec2, tomb).await;
    let orphan = launch(&ec2, Uuid::new_v4()).await;
    let untagged = launch_untagged(&ec2).await;

    // Report only (the default): three orphans, none of the live resource, none terminated.
    let report = sweep(&db.pool, &ec2, OrphanConfig::default())
        .run_once()
        .await
        .expect("sweep");
    assert!(report.ran);
    assert_eq!(report.regions[0].machines, 4);
    assert_eq!(
        found(&report),
        set(&[
            (&orphan, "unknown-resource", "reported"),
            (&tomb_machine, "deleted-resource", "reported"),
            (&untagged, "untagged", "reported"),
        ])
    );
    let metrics = handle.render();
    assert!(
        metrics.contains(&format!(
            "setpoint_orphan_machines{{region=\"{REGION}\"}} 3"
        )),
        "{metrics}"
    );
    // The command lists them, in text and in JSON.
    let (ok, out, err) = common::setpoint(Some(&db.url), &["work", "orphans"]);
    assert!(ok, "{err}");
    for id in [&orphan, &tomb_machine, &untagged] {
        assert!(out.contains(id.as_str()), "{out}");
    }
    assert!(!out.contains(&live_machine), "{out}");
    assert!(
        out.contains("4 managed machine(s), 3 orphan(s), 0 terminated"),
        "{out}"
    );
    let (ok, out, err) = common::setpoint(Some(&db.url), &["work", "orphans", "--json"]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed["orphans"].as_array().map(Vec::len), Some(3), "{out}");
    assert_eq!(listed["sweeps"][0]["region"], REGION);

    // Terminating, but every machine is younger than the default hour: nothing goes.
    let terminating = OrphanConfig {
        terminate: true,
        ..OrphanConfig::default()
    };
    let report = sweep(&db.pool, &ec2, terminating.clone())
        .run_once()
        .await
        .expect("sweep");
    assert_eq!(
        found(&report),
        set(&[
            (&orphan, "unknown-resource", "waiting"),
            (&tomb_machine, "deleted-resource", "reported"),
            (&untagged, "untagged", "reported"),
        ])
    );

    // More old orphans than the limit: none is terminated (a restored database looks so).
    let second = launch(&ec2, Uuid::new_v4()).await;
    let held = OrphanConfig {
        min_age: Duration::ZERO,
        max_terminations: 1,
        ..terminating.clone()
    };
    let report = sweep(&db.pool, &ec2, held).run_once().await.expect("sweep");
    assert_eq!(report.regions[0].terminated, 0);
    assert!(
        found(&report).contains(&(orphan.clone(), "unknown-resource".into(), "held".into())),
        "{:?}",
        found(&report)
    );

    // Within the limit: the two unknown-resource machines are terminated, nothing else.
    let ok = OrphanConfig {
        min_age: Duration::ZERO,
        ..terminating
    };
    let report = sweep(&db.pool, &ec2, ok.clone())
        .run_once()
        .await
        .expect("sweep");
    assert_eq!(report.regions[0].terminated, 2, "{report:?}");
    let now = states(
        &ec2,
        &[&live_machine, &tomb_machine, &orphan, &second, &untagged],
    )
    .await;
    for id in [&orphan, &second] {
        assert!(
            ["shutting-down", "terminated"].contains(&now[id.as_str()].as_str()),
            "{id}: {now:?}"
        );
    }
    for id in [&live_machine, &tomb_machine, &untagged] {
        assert_eq!(
            now[id.as_str()],
            "running",
            "{id} is never terminated: {now:?}"
        );
    }
    // The next sweep no longer lists the live machines as terminable, and keeps what it
    // terminated visible to the operator.
    let report = sweep(&db.pool, &ec2, ok).run_once().await.expect("sweep");
    assert_eq!(report.regions[0].terminated, 0);
    let (_, out, _) = common::setpoint(Some(&db.url), &["work", "orphans", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    let terminated: BTreeSet<String> = listed["orphans"]
        .as_array()
        .expect("orphans")
        .iter()
        .filter(|o| o["action"] == "terminated")
        .filter_map(|o| o["instance_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(terminated, BTreeSet::from([orphan.clone(), second.clone()]));
    let metrics = handle.render();
    assert!(
        metrics.contains(&format!(
            "setpoint_orphan_machines{{region=\"{REGION}\"}} 2"
        )),
        "the tombstone's and the untagged machine are left: {metrics}"
    );
    db.pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two sweeps at once: one sweeps, the other finds the lock taken and does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_engine_sweeps_at_a_time() {
    let dir = test_dir("orphans-lock");
    let port = free_port();
    let _moto: Proc = spawn(
        &format!("exec python3 -m moto.server -H 127.0.0.1 -p {port}"),
        &dir.join("moto.log"),
    );
    wait_port(port).await;
    let db = db_with_orphan_tables().await;
    let ec2 = compute(&format!("http://127.0.0.1:{port}")).await;
    launch(&ec2, Uuid::new_v4()).await;
    // Held by this session, as a sweeping engine holds it.
    let mut holder = setpoint::store::connect_dedicated(&db.pool)
        .await
        .expect("conn");
    assert!(
        setpoint::plugins::orphans::store::orphan_lock_try(&mut holder)
            .await
            .expect("lock")
    );
    let report = sweep(&db.pool, &ec2, OrphanConfig::default())
        .run_once()
        .await
        .expect("sweep");
    assert!(!report.ran, "the lock is taken: nothing swept");
    drop(holder);
    let report = sweep(&db.pool, &ec2, OrphanConfig::default())
        .run_once()
        .await
        .expect("sweep");
    assert!(report.ran, "the lock went with its session");
    db.pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An engine reads `[orphans]` and runs the sweep on its interval; the EC2 plugin migrates the
/// sweep's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_sweeps_on_the_interval_of_its_orphans_table() {
    let dir = test_dir("orphans-engine");
    let port = free_port();
    let _moto: Proc = spawn(
        &format!("exec python3 -m moto.server -H 127.0.0.1 -p {port}"),
        &dir.join("moto.log"),
    );
    wait_port(port).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let ec2 = compute(&endpoint).await;
    let orphan = launch(&ec2, Uuid::new_v4()).await;
    let file: FileConfig =
        toml::from_str("[orphans]\ninterval = \"1s\"\nterminate = false\n").expect("toml");
    let regions = Ec2Regions::from_configs(vec![ec2_config(&endpoint)]).expect("regions");
    let shutdown = CancellationToken::new();
    let engine = EngineBuilder::new(db.pool.clone())
        .env(|_| None)
        .file(file)
        .plugin(Ec2Plugin::with_settings(
            Ec2Settings { ec2: Some(regions) },
            Some(credentials()),
        ))
        .start(shutdown.clone())
        .await
        .expect("engine");
    let pool = db.pool.clone();
    let recorded = common::wait_for("the engine's sweep to record the orphan", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT instance_id FROM orphan_machines WHERE reason = 'unknown-resource'",
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
        }
    })
    .await;
    assert_eq!(recorded, orphan);
    shutdown.cancel();
    engine.wait().await.expect("engine stops");
    // A bad table stops the engine with the key's name.
    let bad: FileConfig = toml::from_str("[orphans]\nterminate = \"yes\"\n").expect("toml");
    let e = EngineBuilder::new(db.pool.clone())
        .env(|_| None)
        .file(bad)
        .plugin(Ec2Plugin::with_settings(
            Ec2Settings {
                ec2: Some(Ec2Regions::from_configs(vec![ec2_config(&endpoint)]).expect("r")),
            },
            Some(credentials()),
        ))
        .start(CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("orphans"), "{e}");
    db.pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A live resource records one machine, and a second one carries its tag (two attempts of one
/// unit both launched: moto ignores `ClientToken`). The sweep reports the second as `extra`,
/// never the recorded one, nor a machine of a resource that a unit holds (its launch is not
/// recorded yet); configured to terminate, it terminates the extra machine and only it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_machine_of_a_live_resource_is_reported_then_terminated() {
    let dir = test_dir("orphans-extra");
    let port = free_port();
    let _moto: Proc = spawn(
        &format!("exec python3 -m moto.server -H 127.0.0.1 -p {port}"),
        &dir.join("moto.log"),
    );
    wait_port(port).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let db = db_with_orphan_tables().await;
    let ec2 = compute_in(&endpoint, EXTRA_REGION).await;

    let live = resource(&db.pool, "live", false).await;
    let recorded = launch(&ec2, live).await;
    let extra = launch(&ec2, live).await;
    record_machine(&db.pool, live, &recorded).await;
    // A resource a unit holds: its second machine may be the one its chain is launching.
    let busy = resource(&db.pool, "busy", false).await;
    let busy_recorded = launch(&ec2, busy).await;
    let busy_new = launch(&ec2, busy).await;
    record_machine(&db.pool, busy, &busy_recorded).await;
    sqlx::query("UPDATE instances SET has_active_work = true WHERE id = $1")
        .bind(busy)
        .execute(&db.pool)
        .await
        .expect("busy");

    let report = sweep_in(&db.pool, &ec2, OrphanConfig::default(), EXTRA_REGION)
        .run_once()
        .await
        .expect("sweep");
    assert_eq!(report.regions[0].machines, 4);
    assert_eq!(found(&report), set(&[(&extra, "extra", "reported")]));
    let (ok, out, err) = common::setpoint(Some(&db.url), &["work", "orphans", "--json"]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed["orphans"][0]["instance_id"], extra.as_str(), "{out}");
    assert_eq!(listed["orphans"][0]["reason"], "extra", "{out}");
    assert_eq!(
        listed["orphans"][0]["resource_id"],
        live.to_string(),
        "{out}"
    );

    let terminating = OrphanConfig {
        terminate: true,
        min_age: Duration::ZERO,
        ..OrphanConfig::default()
    };
    let report = sweep_in(&db.pool, &ec2, terminating.clone(), EXTRA_REGION)
        .run_once()
        .await
        .expect("sweep");
    assert_eq!(report.regions[0].terminated, 1, "{report:?}");
    assert_eq!(found(&report), set(&[(&extra, "extra", "terminated")]));
    let now = states(&ec2, &[&recorded, &extra, &busy_recorded, &busy_new]).await;
    assert!(
        ["shutting-down", "terminated"].contains(&now[extra.as_str()].as_str()),
        "{now:?}"
    );
    for id in [&recorded, &busy_recorded, &busy_new] {
        assert_eq!(now[id.as_str()], "running", "{id}: {now:?}");
    }
    // Once its chain ends (nothing holds it), the busy resource's unrecorded machine is extra.
    sqlx::query("UPDATE instances SET has_active_work = false WHERE id = $1")
        .bind(busy)
        .execute(&db.pool)
        .await
        .expect("settled");
    let report = sweep_in(&db.pool, &ec2, terminating, EXTRA_REGION)
        .run_once()
        .await
        .expect("sweep");
    assert!(
        found(&report).contains(&(busy_new.clone(), "extra".into(), "terminated".into())),
        "{:?}",
        found(&report)
    );
    let now = states(&ec2, &[&recorded, &busy_recorded]).await;
    assert!(now.values().all(|s| s == "running"), "{now:?}");
    db.pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records `machine` as the resource's machine, as the KVX chain's `machine` output does.
async fn record_machine(pool: &PgPool, resource: Uuid, machine: &str) {
    sqlx::query(
        "UPDATE instances SET observed = jsonb_build_object('machine',
             jsonb_build_object('instance_id', $2::text, 'state', 'running'))
          WHERE id = $1",
    )
    .bind(resource)
    .bind(machine)
    .execute(pool)
    .await
    .expect("record the machine");
}
