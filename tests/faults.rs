//! Defects of issue 16 (faults) that need the KVX chains, each with a test that fails without
//! its fix:
//! - 7: an update after a cancelled create launched a second machine while the first (never
//!   recorded) ran on; now the machine step adopts it.
//! - 8: every engine ran its own drift resync over the whole table (N engines: N checks per
//!   instance and interval), and a queued check marked the instance active; now each instance
//!   is checked once per interval whatever the number of engines, and a check never holds it.
//! - 11: an uncertain notification (the engine died between DATA and recording it) held the
//!   resource FAILED; now the instance is READY with `Notified=Unknown`, takes changes, and an
//!   old notification retried after a newer change sends nothing.
//! - 13 (two of the smaller ones): a stopped machine showed `MachineAvailable=True`; engine
//!   connections had no statement or lock timeout.
//!
//! Every wait polls for a condition with a generous limit; nothing asserts on speed.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::peers::{Bearer, Peers, free_port, start_dev, subjects, test_dir};
use serde_json::Value;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, GetInstanceRequest, Instance, InstanceSpec, InstanceStatus,
    UpdateInstanceRequest,
};
use setpoint::kinds::drift::{DriftConfig, DriftScheduler};
use setpoint::kinds::{Chains, KindCatalog, SecretBox};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

type Api = InstanceServiceClient<InterceptedService<Channel, Bearer>>;

/// Flags of a dev engine on the test's database and peers, so that it can be killed and
/// started again on the same state.
fn external(db: &str, peers: &Peers, api_port: u16, extra: &[&str]) -> Vec<String> {
    let port = format!("127.0.0.1:{api_port}");
    let mut flags = vec![
        "--database-url",
        db,
        "--ec2-endpoint",
        &peers.moto,
        "--smtp",
        &peers.smtp,
        "--lease",
        "2s",
        "--poll-interval",
        "100ms",
        "--listen",
        &port,
    ];
    flags.extend_from_slice(extra);
    let mut flags: Vec<String> = flags.into_iter().map(str::to_owned).collect();
    flags.extend(["--kubernetes-url".to_owned(), peers.k8s.url()]);
    flags
}

async fn client(info: &Value) -> Api {
    // The admin token of the tenant: it reads raw failure texts too.
    let server = info["server"].as_str().expect("server").to_owned();
    let token = info["admin_token"].as_str().expect("token").to_owned();
    let channel = Channel::from_shared(server)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let header = format!("Bearer {token}").parse().expect("header");
    InstanceServiceClient::with_interceptor(channel, Bearer(header))
}

fn full(name: &str) -> String {
    format!("tenants/demo/instances/{name}")
}

fn spec(plan: &str) -> InstanceSpec {
    InstanceSpec {
        plan: plan.into(),
        region: "us-east-1".into(),
        size_gb: 10,
        owner_email: "owner@example.com".into(),
    }
}

async fn create(api: &mut Api, name: &str) -> Instance {
    api.create_instance(CreateInstanceRequest {
        parent: "tenants/demo".into(),
        instance_id: name.into(),
        instance: Some(Instance {
            spec: Some(spec("kvx.small")),
            ..Instance::default()
        }),
        request_id: format!("create-{name}"),
        bulk: false,
    })
    .await
    .expect("create")
    .into_inner()
}

async fn update(api: &mut Api, name: &str, plan: &str) -> Result<Instance, tonic::Status> {
    api.update_instance(UpdateInstanceRequest {
        instance: Some(Instance {
            name: full(name),
            spec: Some(spec(plan)),
            ..Instance::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["spec.plan".into()],
        }),
        request_id: format!("update-{name}-{plan}"),
        bulk: false,
    })
    .await
    .map(|r| r.into_inner())
}

async fn get(api: &mut Api, name: &str) -> Instance {
    api.get_instance(GetInstanceRequest { name: full(name) })
        .await
        .expect("get")
        .into_inner()
}

/// Waits until `name` is READY with no work at `generation`.
async fn ready_at(api: &Api, name: &str, generation: i64) -> Instance {
    common::wait_for(&format!("{name} READY at generation {generation}"), || {
        let mut api = api.clone();
        async move {
            let i = get(&mut api, name).await;
            (i.status == InstanceStatus::Ready as i32
                && i.generation == generation
                && !i.has_active_work)
                .then_some(i)
        }
    })
    .await
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

/// The machines moto holds for setpoint instance `uid` that are not gone: (id, state) each.
fn live_machines(endpoint: &str, uid: &str) -> Vec<(String, String)> {
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = []
for page in ec2.get_paginator('describe_instances').paginate(
        Filters=[{'Name': 'tag:setpoint:instance-id', 'Values': [sys.argv[2]]}]):
    for r in page['Reservations']:
        for i in r['Instances']:
            if i['State']['Name'] not in ('terminated', 'shutting-down'):
                out.append([i['InstanceId'], i['State']['Name']])
print(json.dumps(sorted(out)))
"#;
    let out = Command::new("python3")
        .args(["-c", script, endpoint, uid])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// A string field of the `machine` recorded on the instance.
fn recorded_machine(instance: &Instance) -> Option<String> {
    use prost_types::value::Kind;
    match instance
        .observed
        .as_ref()?
        .fields
        .get("machine")?
        .kind
        .as_ref()?
    {
        Kind::StructValue(m) => match m.fields.get("instance_id")?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The status of condition `kind` on the instance.
fn condition(instance: &Instance, kind: &str) -> Option<String> {
    use prost_types::value::Kind;
    let Kind::ListValue(list) = instance
        .observed
        .as_ref()?
        .fields
        .get("conditions")?
        .kind
        .as_ref()?
    else {
        return None;
    };
    list.values.iter().find_map(|c| {
        let Some(Kind::StructValue(c)) = c.kind.as_ref() else {
            return None;
        };
        let field = |k: &str| match c.fields.get(k)?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        };
        (field("type")? == kind).then(|| field("status")).flatten()
    })
}

/// The id of the unit of `kind` once it is parked.
async fn parked_unit(pool: &sqlx::PgPool, kind: &str) -> i64 {
    common::wait_for(&format!("a parked {kind} unit"), || async {
        sqlx::query_scalar::<_, i64>("SELECT id FROM work WHERE kind = $1 AND state = 'parked'")
            .bind(kind)
            .fetch_optional(pool)
            .await
            .ok()
            .flatten()
    })
    .await
}

fn ready_mails(maildir: &Path, name: &str) -> usize {
    let needle = format!("\"{name}\" is ready");
    subjects(maildir)
        .iter()
        .filter(|s| s.contains(&needle))
        .count()
}

/// Defect 7: a create whose launch happened but was never recorded (its unit died after
/// `RunInstances` with no attempt left, and the operator cancelled it), then an update: the
/// update's machine step adopts the running machine tagged with the instance instead of
/// launching a second one next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_after_a_cancelled_create_adopts_the_machine_it_launched() {
    let dir = test_dir("faults-cancelled-create");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let flags = external(&db.url, &peers, free_port(), &[]);

    let point = "ec2.after-run-instances";
    let (engine, info) = start_dev(&dir, &flags, &[("SETPOINT_FAILPOINTS", point)]).await;
    let mut api = client(&info).await;
    let created = create(&mut api, "cc").await;
    wait_marker(&dir.join("dev.log"), point).await;
    // The launch happened and its attempt never reports back; with no attempt left, the next
    // claim parks the unit.
    sqlx::query("UPDATE work SET max_attempts = attempt WHERE kind = 'kvx.create.ec2'")
        .execute(&db.pool)
        .await
        .expect("attempts");
    drop(engine);
    let launched = live_machines(&peers.moto, &created.uid);
    assert_eq!(launched.len(), 1, "the killed attempt launched one machine");

    let (_engine, info) = start_dev(&dir, &flags, &[]).await;
    let mut api = client(&info).await;
    let unit = parked_unit(&db.pool, "kvx.create.ec2").await;
    let (ok, _, err) = common::setpoint(Some(&db.url), &["work", "cancel", &unit.to_string()]);
    assert!(ok, "{err}");
    let cancelled = get(&mut api, "cc").await;
    assert_eq!(cancelled.status, InstanceStatus::Failed as i32);
    assert_eq!(
        recorded_machine(&cancelled),
        None,
        "the launch was never recorded"
    );

    update(&mut api, "cc", "kvx.medium").await.expect("update");
    let updated = ready_at(&api, "cc", 2).await;
    let now = live_machines(&peers.moto, &created.uid);
    assert_eq!(
        now,
        vec![(launched[0].0.clone(), "running".to_owned())],
        "one machine: the one the cancelled create launched, adopted"
    );
    assert_eq!(recorded_machine(&updated), Some(launched[0].0.clone()));
    db.pool.close().await;
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Defect 11: the engine dies between the mail's DATA and recording it, so the send's outcome
/// is unknown. The instance is READY all the same, with `Notified=Unknown`, takes a change at
/// once (whose own mail goes out), and the old notification, retried by an operator after the
/// change, sends nothing: one mail per generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_notification_leaves_the_instance_ready_and_changeable() {
    let dir = test_dir("faults-uncertain-mail");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let flags = external(&db.url, &peers, free_port(), &["--resync-interval", "1s"]);

    let point = "email.after-send";
    let (engine, info) = start_dev(&dir, &flags, &[("SETPOINT_FAILPOINTS", point)]).await;
    let mut api = client(&info).await;
    create(&mut api, "nn").await;
    wait_marker(&dir.join("dev.log"), point).await;
    drop(engine);
    assert_eq!(ready_mails(&peers.maildir, "nn"), 1, "the mail went out");

    let (_engine, info) = start_dev(&dir, &flags, &[]).await;
    let mut api = client(&info).await;
    let unit = parked_unit(&db.pool, "kvx.create.notify").await;
    let ready = ready_at(&api, "nn", 1).await;
    assert_eq!(condition(&ready, "Notified").as_deref(), Some("Unknown"));
    assert_eq!(condition(&ready, "Ready").as_deref(), Some("True"));
    // It stays under drift checks (which look at its machine) while the notification waits.
    let pool = db.pool.clone();
    common::wait_for("a drift check after the notification parked", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM work_events WHERE event = 'succeeded' AND work_id > $1
                   AND detail::text LIKE '%describe_instance%'",
            )
            .bind(unit)
            .fetch_one(&pool)
            .await
            .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;

    // The instance takes a change at once, and the change's own mail goes out.
    update(&mut api, "nn", "kvx.large")
        .await
        .expect("a change is accepted while the old notification is parked");
    ready_at(&api, "nn", 2).await;
    common::wait_for("the update's ready mail", || async {
        (ready_mails(&peers.maildir, "nn") == 2).then_some(())
    })
    .await;

    // The operator retries the old notification: superseded by the change, it sends nothing.
    let (ok, _, err) = common::setpoint(Some(&db.url), &["work", "retry", &unit.to_string()]);
    assert!(ok, "{err}");
    let pool = db.pool.clone();
    common::wait_for("the retried notification to end", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM work WHERE id = $1")
                .bind(unit)
                .fetch_one(&pool)
                .await
                .ok()?;
            (n == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        ready_mails(&peers.maildir, "nn"),
        2,
        "one mail per generation"
    );
    db.pool.close().await;
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The chain runner of the KVX kind alone, for drift schedulers without an engine.
fn kvx_chains(pool: &sqlx::PgPool) -> Arc<Chains> {
    let mut catalog = KindCatalog::new();
    catalog.add(setpoint::plugins::kvx::kind()).expect("kind");
    Arc::new(Chains::new(
        Arc::new(catalog),
        Arc::new(SecretBox::none()),
        pool.clone(),
    ))
}

/// Defect 8: three engines' drift schedulers over one database check each instance once per
/// interval (not three times), and a queued check never marks its instance active (so it
/// never makes a change wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_engines_check_each_instance_once_per_interval() {
    const INSTANCES: usize = 30;
    let interval = Duration::from_secs(2);
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    for i in 0..INSTANCES {
        sqlx::query(
            "INSERT INTO instances (id, tenant, name, kind, spec, status)
             VALUES ($1, 'acme', $2, 'kvx.instance', '{}', 'READY')",
        )
        .bind(Uuid::new_v4())
        .bind(format!("d-{i:02}"))
        .execute(&db.pool)
        .await
        .expect("instance");
    }
    let chains = kvx_chains(&db.pool);
    let now = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT now()")
            .fetch_one(&db.pool)
            .await
            .expect("now")
    };
    let started = now().await;
    let stop = CancellationToken::new();
    let engines: Vec<_> = (0..3)
        .map(|_| {
            let s = DriftScheduler::new(
                db.pool.clone(),
                chains.clone(),
                DriftConfig {
                    interval,
                    batch: 500,
                },
            );
            tokio::spawn(s.run(stop.clone()))
        })
        .collect();
    // Long enough for every instance to come due at least once (the first check of each falls
    // at random within the first interval).
    let pool = db.pool.clone();
    common::wait_for("every instance checked twice", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT resource_id FROM work WHERE kind = 'kvx.observe'
                  GROUP BY resource_id HAVING count(*) >= 2) t",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (n == INSTANCES as i64).then_some(())
        }
    })
    .await;
    stop.cancel();
    for e in engines {
        e.await.expect("scheduler");
    }
    let elapsed = (now().await - started).to_std().expect("elapsed");
    // Each claim moves the next check one interval on, so in `elapsed` an instance can be
    // checked at most elapsed / interval + 1 times, however many engines schedule.
    let most = (elapsed.as_secs_f64() / interval.as_secs_f64()).floor() as i64 + 1;
    let counts: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT resource_id, count(*) FROM work WHERE kind = 'kvx.observe' GROUP BY resource_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("counts");
    assert_eq!(counts.len(), INSTANCES);
    for (id, n) in &counts {
        assert!(
            *n <= most,
            "instance {id} was checked {n} times in {elapsed:?} (at most {most} with one check \
             per interval)"
        );
    }
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE has_active_work")
        .fetch_one(&db.pool)
        .await
        .expect("active");
    assert_eq!(active, 0, "a queued check never marks its instance active");
    let holding: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM work WHERE kind = 'kvx.observe' AND holds_resource",
    )
    .fetch_one(&db.pool)
    .await
    .expect("holding");
    assert_eq!(holding, 0, "checks run beside their instance");
    db.pool.close().await;
}

/// The drift schedule after a pause longer than the interval (no engine ran): the next round
/// checks each live READY resource once, not once per missed interval, removes deleted
/// resources from the schedule, and the round after it finds nothing due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_pause_each_resource_is_checked_once_and_deleted_ones_leave() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    for (i, status, deleted) in [
        (0, "READY", false),
        (1, "READY", false),
        (2, "READY", false),
        (3, "CREATING", false),
        (4, "DELETED", true),
        (5, "READY", false),
    ] {
        sqlx::query(
            "INSERT INTO instances (id, tenant, name, kind, spec, status, deleted_at)
             VALUES ($1, 'acme', $2, 'kvx.instance', '{}', $3,
                     CASE WHEN $4 THEN now() END)",
        )
        .bind(Uuid::new_v4())
        .bind(format!("p-{i}"))
        .bind(status)
        .bind(deleted)
        .execute(&db.pool)
        .await
        .expect("instance");
    }
    let chains = kvx_chains(&db.pool);
    let scheduler = DriftScheduler::new(
        db.pool.clone(),
        chains,
        DriftConfig {
            interval: Duration::from_secs(3600),
            batch: 2,
        },
    );
    // The first round places the live resources and starts the kind's cursor at now.
    assert_eq!(scheduler.run_once().await.expect("round"), 0);
    let placed: i64 = sqlx::query_scalar("SELECT count(*) FROM drift_schedule")
        .fetch_one(&db.pool)
        .await
        .expect("placed");
    assert_eq!(placed, 5, "every live resource joins, whatever its status");
    // The pruned row of a resource (its tombstone gone) and a resource deleted since it joined.
    sqlx::query(
        "INSERT INTO drift_schedule (resource_id, kind, phase) VALUES ($1, 'kvx.instance', 0.5)",
    )
    .bind(Uuid::new_v4())
    .execute(&db.pool)
    .await
    .expect("pruned row");
    sqlx::query("UPDATE instances SET deleted_at = now(), status = 'DELETED' WHERE name = 'p-5'")
        .execute(&db.pool)
        .await
        .expect("delete");
    // No engine ran for three intervals.
    sqlx::query("UPDATE drift_cursors SET through = through - interval '3 hours'")
        .execute(&db.pool)
        .await
        .expect("pause");
    // batch 2: the catch-up is several transactions, and still one check per resource.
    assert_eq!(scheduler.run_once().await.expect("catch-up"), 3);
    let checked: Vec<String> = sqlx::query_scalar(
        "SELECT i.name FROM work w JOIN instances i ON i.id = w.resource_id
         WHERE w.kind = 'kvx.observe' ORDER BY i.name",
    )
    .fetch_all(&db.pool)
    .await
    .expect("checks");
    assert_eq!(checked, ["p-0", "p-1", "p-2"]);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM drift_schedule")
        .fetch_one(&db.pool)
        .await
        .expect("left");
    assert_eq!(
        left, 4,
        "the deleted and the pruned resource left the schedule"
    );
    assert_eq!(scheduler.run_once().await.expect("next round"), 0);
    db.pool.close().await;
}

/// Runs `action` (`stop_instances` or `start_instances`) on the machines of `uid` in moto.
fn machine_action(endpoint: &str, uid: &str, action: &str) {
    let script = r#"
import boto3, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
ids = [i['InstanceId'] for r in ec2.describe_instances(Filters=[
        {'Name': 'tag:setpoint:instance-id', 'Values': [sys.argv[2]]},
        {'Name': 'instance-state-name', 'Values': ['running', 'stopped']}])['Reservations']
       for i in r['Instances']]
getattr(ec2, sys.argv[3])(InstanceIds=ids)
"#;
    let ok = Command::new("python3")
        .args(["-c", script, endpoint, uid, action])
        .status()
        .expect("python3");
    assert!(ok.success());
}

/// Defect 13: a machine stopped behind setpoint's back showed `MachineAvailable=True`. The
/// drift check now says False (`MachineNotRunning`), and True again once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_machine_is_not_available() {
    let dir = test_dir("faults-stopped");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let flags = external(&db.url, &peers, free_port(), &["--resync-interval", "1s"]);
    let (_engine, info) = start_dev(&dir, &flags, &[]).await;
    let mut api = client(&info).await;
    let created = create(&mut api, "st").await;
    ready_at(&api, "st", 1).await;
    for (action, want) in [("stop_instances", "False"), ("start_instances", "True")] {
        machine_action(&peers.moto, &created.uid, action);
        common::wait_for(&format!("MachineAvailable={want}"), || {
            let mut api = api.clone();
            async move {
                let i = get(&mut api, "st").await;
                (condition(&i, "MachineAvailable").as_deref() == Some(want)).then_some(())
            }
        })
        .await;
    }
    db.pool.close().await;
    drop(peers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Defect 13: engine connections had no statement or lock timeout, so a statement stuck
/// behind an operator's lock held its connection (and the unit's lease) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_connections_time_out_statements_and_lock_waits() {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let pool = setpoint::store::connect(&db.url, 2).await.expect("pool");
    let statement: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    let lock: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!((statement.as_str(), lock.as_str()), ("30s", "10s"));
    // A lock held elsewhere makes a statement fail after the lock timeout, not wait for ever.
    let mut holder = db.pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE work IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .expect("lock");
    let waited = sqlx::query("SELECT count(*) FROM work")
        .fetch_one(&pool)
        .await;
    let e = waited.expect_err("the lock wait times out");
    assert!(e.to_string().contains("lock timeout"), "{e}");
    holder.rollback().await.expect("rollback");
    pool.close().await;
    db.pool.close().await;
}
