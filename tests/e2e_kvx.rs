//! End to end through the gRPC API on the dev stack (`setpoint dev` as a child process, with
//! real moto, aiosmtpd and PostgreSQL): 20 instances created and deleted; a change during
//! active work refused, then accepted, and a plan change resizing the EC2 machine; and 50 creates surviving repeated SIGKILLs of the engine
//! with exactly one machine and at most one "ready" mail each.
//!
//! Nothing here asserts on speed: every wait polls for a condition (with a generous limit that
//! only guards against a hung test).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::peers::{Bearer, Peers, Proc, free_port, subjects};
use serde_json::Value;
use setpoint::api::proto::instance_service_client::InstanceServiceClient;
use setpoint::api::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, GetInstanceRequest, Instance, InstanceSpec,
    InstanceStatus, UpdateInstanceRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Api = InstanceServiceClient<InterceptedService<Channel, Bearer>>;

const LIMIT: Duration = Duration::from_secs(150);

/// `setpoint dev` with `extra` flags; returns the process and its info file.
async fn start_dev(dir: &Path, extra: &[String]) -> (Proc, Value) {
    start_dev_env(dir, extra, &[]).await
}

/// `setpoint dev` with `extra` flags and environment.
async fn start_dev_env(dir: &Path, extra: &[String], env: &[(&str, &str)]) -> (Proc, Value) {
    let info = dir.join("info.json");
    let _ = std::fs::remove_file(&info);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))
        .expect("log");
    use std::os::unix::process::CommandExt;
    let child = Command::new(env!("CARGO_BIN_EXE_setpoint"))
        .arg("dev")
        .arg("--dir")
        .arg(dir.join("stack"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--info-file")
        .arg(&info)
        .args(extra)
        // The web console is on by default in dev, at 127.0.0.1:8080: a port of its own, so
        // that stacks side by side do not collide (a flag in `extra` wins; a release before
        // the console ignores the variable).
        .env("SETPOINT_CONSOLE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,sqlx=warn")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("setpoint dev");
    let proc = Proc(child);
    let value = common::wait_for("setpoint dev to start", || {
        let info = info.clone();
        async move {
            let text = std::fs::read_to_string(&info).ok()?;
            serde_json::from_str::<Value>(&text).ok()
        }
    })
    .await;
    (proc, value)
}

async fn client(info: &Value) -> Api {
    client_as(info, "tenant_token").await
}

/// A client with the token `which` of `setpoint dev` (`tenant_token` or `admin_token`).
async fn client_as(info: &Value, which: &str) -> Api {
    let server = info["server"].as_str().expect("server").to_owned();
    let token = info[which].as_str().expect("token").to_owned();
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

async fn create(api: &mut Api, name: &str) -> Result<Instance, tonic::Status> {
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
    .map(|r| r.into_inner())
}

async fn get(api: &mut Api, name: &str) -> Option<Instance> {
    api.get_instance(GetInstanceRequest { name: full(name) })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Waits until every instance of `names` has status `want`.
async fn wait_status(api: &mut Api, names: &[String], want: InstanceStatus) {
    let start = Instant::now();
    loop {
        let mut pending = Vec::new();
        for n in names {
            match get(api, n).await {
                Some(i) if i.status == want as i32 => {}
                other => pending.push((n.clone(), other.map(|i| (i.status, i.last_error)))),
            }
        }
        if pending.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "still waiting for {want:?}: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `name` is READY at `generation`; returns it.
async fn ready_at_generation(api: &Api, name: &str, generation: i64) -> Instance {
    common::wait_for(
        &format!("{name} to be ready at generation {generation}"),
        || {
            let mut api = api.clone();
            async move {
                get(&mut api, name).await.filter(|i| {
                    i.status == InstanceStatus::Ready as i32 && i.generation == generation
                })
            }
        },
    )
    .await
}

/// Waits until at least `n` "is ready" mails about `name` are in `maildir`.
async fn wait_ready_mails(maildir: &Path, name: &str, n: usize) {
    common::wait_for(&format!("{n} ready mails about {name}"), || {
        let s = subjects(maildir);
        async move { (count(&s, name, "is ready") >= n).then_some(()) }
    })
    .await;
}

/// EC2 machines in moto by the setpoint instance id tag: id → states.
fn machines(endpoint: &str) -> BTreeMap<String, Vec<String>> {
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = {}
for page in ec2.get_paginator('describe_instances').paginate():
    for r in page['Reservations']:
        for i in r['Instances']:
            tags = {t['Key']: t['Value'] for t in i.get('Tags', [])}
            out.setdefault(tags.get('setpoint:instance-id', '?'), []).append(i['State']['Name'])
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", script, endpoint])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The EC2 machines moto holds for setpoint instance `uid`: (state, instance type) each.
fn machine_sizes(endpoint: &str, uid: &str) -> Vec<(String, String)> {
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = []
for page in ec2.get_paginator('describe_instances').paginate(
        Filters=[{'Name': 'tag:setpoint:instance-id', 'Values': [sys.argv[2]]}]):
    for r in page['Reservations']:
        for i in r['Instances']:
            out.append([i['State']['Name'], i['InstanceType']])
print(json.dumps(out))
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

/// The instance type of the dev stack's machines for `plan`.
fn plan_size(plan: &str) -> String {
    setpoint::dev::stack::DEV_PLAN_SIZES
        .iter()
        .find(|(p, _)| *p == plan)
        .map(|(_, t)| (*t).to_owned())
        .expect("a dev plan")
}

/// A string field of the `machine` recorded in the instance's observed state.
fn observed_machine(instance: &Instance, field: &str) -> Option<String> {
    use prost_types::value::Kind;
    let observed = instance.observed.as_ref()?;
    match observed.fields.get("machine")?.kind.as_ref()? {
        Kind::StructValue(m) => match m.fields.get(field)?.kind.as_ref()? {
            Kind::StringValue(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Terminates machine(s) of a resource behind setpoint's back.
fn terminate_behind_our_back(endpoint: &str, resource: &str) {
    let script = r#"
import boto3, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
ids = [i['InstanceId'] for r in ec2.describe_instances(Filters=[{'Name': 'tag:setpoint:instance-id', 'Values': [sys.argv[2]]}])['Reservations'] for i in r['Instances']]
ec2.terminate_instances(InstanceIds=ids)
"#;
    let s = Command::new("python3")
        .args(["-c", script, endpoint, resource])
        .status()
        .expect("python3");
    assert!(s.success());
}

/// The status of the instance's `Notified` condition, if it has one.
fn notified(instance: &Instance) -> Option<String> {
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
        (field("type")? == "Notified")
            .then(|| field("status"))
            .flatten()
    })
}

fn count(subjects: &[String], name: &str, what: &str) -> usize {
    let needle = format!("\"{name}\" {what}");
    subjects.iter().filter(|s| s.contains(&needle)).count()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("setpoint-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_instances_live_and_die_and_changes_wait_for_the_chain() {
    let dir = tmp("twenty");
    let (_dev, info) = start_dev(&dir, &["--listen".into(), "127.0.0.1:0".into()]).await;
    let mut api = client(&info).await;
    let moto = info["ec2_endpoint"].as_str().expect("moto").to_owned();
    let maildir = PathBuf::from(info["maildir"].as_str().expect("maildir"));

    let names: Vec<String> = (0..20).map(|i| format!("db-{i:02}")).collect();
    for n in &names {
        create(&mut api, n).await.expect("create");
    }
    wait_status(&mut api, &names, InstanceStatus::Ready).await;
    let mut uids = BTreeSet::new();
    for n in &names {
        let i = get(&mut api, n).await.expect("instance");
        let observed = format!("{:?}", i.observed);
        assert!(
            observed.contains("Available"),
            "Ready condition of {n}: {observed}"
        );
        uids.insert(i.uid);
    }
    let m = machines(&moto);
    assert_eq!(m.len(), 20, "one machine per instance: {m:?}");
    for uid in &uids {
        assert_eq!(
            m.get(uid).map(Vec::len),
            Some(1),
            "machines of {uid}: {m:?}"
        );
    }
    let s = common::wait_for("20 ready mails", || {
        let s = subjects(&maildir);
        async move { (s.iter().filter(|x| x.ends_with("is ready")).count() >= 20).then_some(s) }
    })
    .await;
    for n in &names {
        assert_eq!(count(&s, n, "is ready"), 1, "ready mails of {n}");
    }

    for n in &names {
        api.delete_instance(DeleteInstanceRequest {
            name: full(n),
            request_id: format!("delete-{n}"),
            bulk: false,
        })
        .await
        .expect("delete");
    }
    common::wait_for("every instance deleted", || {
        let mut api = api.clone();
        let names = names.clone();
        async move {
            for n in &names {
                if get(&mut api, n)
                    .await
                    .is_some_and(|i| i.status != InstanceStatus::Deleted as i32)
                {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let m = machines(&moto);
    assert!(
        m.values()
            .flatten()
            .all(|s| s == "terminated" || s == "shutting-down"),
        "every machine terminated: {m:?}"
    );
    let s =
        common::wait_for("20 deleted mails", || {
            let s = subjects(&maildir);
            async move {
                (s.iter().filter(|x| x.ends_with("has been deleted")).count() >= 20).then_some(s)
            }
        })
        .await;
    for n in &names {
        assert_eq!(count(&s, n, "has been deleted"), 1, "deleted mails of {n}");
    }
    let pool = setpoint::store::connect(info["database_url"].as_str().expect("db"), 2)
        .await
        .expect("db");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM work")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(left, 0, "no unit left");
    // Each step's history names the adapter call it made, with the unit's token.
    let done: Vec<(String, Value)> = sqlx::query_as(
        "SELECT token, detail->'calls' FROM work_events WHERE event = 'succeeded' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .expect("events");
    let mut operations = BTreeMap::<String, usize>::new();
    for (token, calls) in &done {
        let calls = calls.as_array().cloned().unwrap_or_default();
        assert!(!calls.is_empty(), "unit with token {token} lists no call");
        for call in calls {
            let call = call.as_str().unwrap_or_default().to_owned();
            let operation = call
                .strip_suffix(&format!(" token={token}"))
                .unwrap_or_else(|| panic!("{call:?} does not carry token {token}"));
            *operations.entry(operation.to_owned()).or_default() += 1;
        }
    }
    for operation in [
        "compute:ensure_instance",
        "cluster:apply_instance",
        "mail:send",
        "cluster:delete_instance",
        "compute:terminate_instance",
    ] {
        assert!(
            operations.get(operation).is_some_and(|n| *n >= 20),
            "{operation} at least once per instance: {operations:?}"
        );
    }

    // A change while the create chain runs is refused; after it ends it is accepted.
    create(&mut api, "chg").await.expect("create chg");
    let mut changed = Instance {
        name: full("chg"),
        spec: Some(spec("kvx.medium")),
        ..Instance::default()
    };
    let refused = api
        .update_instance(UpdateInstanceRequest {
            instance: Some(changed.clone()),
            update_mask: None,
            request_id: "update-chg-1".into(),
            bulk: false,
        })
        .await
        .expect_err("refused while active");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    wait_status(&mut api, &["chg".to_owned()], InstanceStatus::Ready).await;
    let created = get(&mut api, "chg").await.expect("chg");
    let uid = created.uid.clone();
    let machine_id = observed_machine(&created, "instance_id").expect("machine recorded");
    assert_eq!(
        machine_sizes(&moto, &uid),
        vec![("running".to_owned(), plan_size("kvx.small"))],
        "chg is launched at its plan's size"
    );

    // A plan change resizes the same machine (EC2 → Kubernetes → "updated" mail).
    changed.spec = Some(spec("kvx.medium"));
    api.update_instance(UpdateInstanceRequest {
        instance: Some(changed.clone()),
        update_mask: None,
        request_id: "update-chg-2".into(),
        bulk: false,
    })
    .await
    .expect("accepted after the chain");
    let updated = ready_at_generation(&api, "chg", 2).await;
    assert_eq!(
        machine_sizes(&moto, &uid),
        vec![("running".to_owned(), plan_size("kvx.medium"))],
        "still exactly one machine, running at the new plan's size"
    );
    assert_eq!(
        observed_machine(&updated, "instance_id").as_deref(),
        Some(machine_id.as_str()),
        "the same machine, resized in place"
    );
    assert_eq!(
        observed_machine(&updated, "instance_type"),
        Some(plan_size("kvx.medium"))
    );
    let observed = format!("{:?}", updated.observed);
    assert!(observed.contains("Resized"), "MachineAvailable: {observed}");
    wait_ready_mails(&maildir, "chg", 2).await;
    assert_eq!(
        count(&subjects(&maildir), "chg", "is ready"),
        2,
        "one mail for the create, one for the update"
    );

    // A change that keeps the plan leaves the machine alone and still ends with a mail.
    changed.spec = Some(InstanceSpec {
        size_gb: 20,
        ..spec("kvx.medium")
    });
    api.update_instance(UpdateInstanceRequest {
        instance: Some(changed),
        update_mask: None,
        request_id: "update-chg-3".into(),
        bulk: false,
    })
    .await
    .expect("a second update");
    ready_at_generation(&api, "chg", 3).await;
    assert_eq!(
        machine_sizes(&moto, &uid),
        vec![("running".to_owned(), plan_size("kvx.medium"))]
    );
    wait_ready_mails(&maildir, "chg", 3).await;

    // A plan change after the machine was terminated behind setpoint's back launches a new
    // machine of the new plan instead of parking (no resync runs in this test).
    terminate_behind_our_back(&moto, &uid);
    api.update_instance(UpdateInstanceRequest {
        instance: Some(Instance {
            name: full("chg"),
            spec: Some(InstanceSpec {
                size_gb: 20,
                ..spec("kvx.large")
            }),
            ..Instance::default()
        }),
        update_mask: None,
        request_id: "update-chg-4".into(),
        bulk: false,
    })
    .await
    .expect("an update of a machine-less instance");
    let relaunched = ready_at_generation(&api, "chg", 4).await;
    let mut sizes = machine_sizes(&moto, &uid);
    sizes.sort();
    assert_eq!(
        sizes,
        vec![
            ("running".to_owned(), plan_size("kvx.large")),
            ("terminated".to_owned(), plan_size("kvx.medium")),
        ],
        "one new machine at the new plan's size, next to the terminated one"
    );
    assert_ne!(
        observed_machine(&relaunched, "instance_id").as_deref(),
        Some(machine_id.as_str()),
        "the new machine is recorded"
    );
    wait_ready_mails(&maildir, "chg", 4).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `setpoint dev` against the test's own peers, on a fixed API port.
async fn start_engine(
    dir: &Path,
    db: &str,
    moto: &str,
    smtp: &str,
    k8s: &str,
    port: u16,
    resync: bool,
) -> (Proc, Api) {
    let mut extra: Vec<String> = [
        "--database-url",
        db,
        "--ec2-endpoint",
        moto,
        "--smtp",
        smtp,
        "--kubernetes-url",
        k8s,
        "--lease",
        "2s",
        "--poll-interval",
        "100ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    extra.extend(["--listen".to_owned(), format!("127.0.0.1:{port}")]);
    if resync {
        extra.extend(["--resync-interval".to_owned(), "1s".to_owned()]);
    }
    let (proc, info) = start_dev(dir, &extra).await;
    // The admin token of the same tenant: an operator reads a failure's raw text (a tenant
    // reads a curated sentence), which says why a chain failed.
    let api = client_as(&info, "admin_token").await;
    (proc, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_creates_survive_sigkills_and_drift_is_healed() {
    use rand::Rng;
    let dir = tmp("crash");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let (moto, smtp, k8s, maildir) = (
        peers.moto.clone(),
        peers.smtp.clone(),
        &peers.k8s,
        peers.maildir.clone(),
    );
    let api_port = free_port();

    let (mut engine, mut api) =
        start_engine(&dir, &db.url, &moto, &smtp, &k8s.url(), api_port, false).await;
    let names: Vec<String> = (0..50).map(|i| format!("c-{i:02}")).collect();
    for n in &names {
        create(&mut api, n).await.expect("create");
    }
    for round in 0..3 {
        let pause = rand::rng().random_range(200..1500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let pid = engine.0.id();
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = engine.0.wait();
        drop(engine);
        eprintln!("round {round}: killed the engine after {pause} ms");
        (engine, api) = start_engine(
            &dir,
            &db.url,
            &moto,
            &smtp,
            &k8s.url(),
            api_port,
            round == 2,
        )
        .await;
    }

    // Every chain ends: READY, possibly with `Notified=Unknown` beside a parked "outcome
    // unknown" mail (a notification never holds its instance), or FAILED on such a mail (as
    // engines before that change ended it).
    let start = Instant::now();
    let mut failed = BTreeSet::new();
    loop {
        let mut open = Vec::new();
        failed.clear();
        for n in &names {
            let i = get(&mut api, n).await.expect("instance");
            if i.status == InstanceStatus::Ready as i32
                && notified(&i).as_deref() == Some("Unknown")
            {
                failed.insert(n.clone());
            } else if i.status == InstanceStatus::Failed as i32 {
                assert!(
                    i.last_error.contains("outcome") || i.last_error.contains("may have"),
                    "{n} failed for another reason: {}",
                    i.last_error
                );
                failed.insert(n.clone());
            } else if i.status != InstanceStatus::Ready as i32 {
                open.push(n.clone());
            }
        }
        if open.is_empty() {
            break;
        }
        assert!(start.elapsed() < LIMIT, "chains still open: {open:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let m = machines(&moto);
    let mut uids = BTreeMap::new();
    for n in &names {
        let i = get(&mut api, n).await.expect("instance");
        assert_eq!(
            m.get(&i.uid).map(Vec::len),
            Some(1),
            "exactly one machine for {n}: {m:?}"
        );
        uids.insert(n.clone(), i.uid);
    }
    // The ready mail is a side step: an instance is READY before its mail is sent (or parked
    // as outcome unknown, `Notified=Unknown`), so wait for each one to be either.
    let start = Instant::now();
    let s = loop {
        let s = subjects(&maildir);
        let mut waiting = Vec::new();
        for n in &names {
            if failed.contains(n) || count(&s, n, "is ready") > 0 {
                continue;
            }
            let i = get(&mut api, n).await.expect("instance");
            if notified(&i).as_deref() == Some("Unknown") {
                failed.insert(n.clone());
            } else {
                waiting.push(n.clone());
            }
        }
        if waiting.is_empty() {
            break s;
        }
        assert!(
            start.elapsed() < LIMIT,
            "ready mails neither sent nor uncertain: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for n in &names {
        let ready = count(&s, n, "is ready");
        assert!(ready <= 1, "duplicate ready mail for {n}");
        if !failed.contains(n) {
            assert_eq!(ready, 1, "ready mail of {n}");
        }
    }
    eprintln!(
        "{} of 50 ended with an outcome-unknown mail parked",
        failed.len()
    );

    // Drift: a machine terminated behind our back is replaced by the resync.
    let victim = names
        .iter()
        .find(|n| !failed.contains(*n))
        .expect("a ready instance")
        .clone();
    let uid = uids[&victim].clone();
    terminate_behind_our_back(&moto, &uid);
    common::wait_for("the machine to be replaced", || {
        let moto = moto.clone();
        let uid = uid.clone();
        async move {
            let m = machines(&moto);
            let states = m.get(&uid)?;
            (states.len() == 2 && states.iter().any(|s| s == "running")).then_some(())
        }
    })
    .await;
    wait_status(
        &mut api,
        std::slice::from_ref(&victim),
        InstanceStatus::Ready,
    )
    .await;

    // The drift checks of one round were observed together: one describe for many machines.
    let pool = setpoint::store::connect(&db.url, 2).await.expect("db");
    let calls: Vec<Value> = sqlx::query_scalar(
        "SELECT detail->'calls' FROM work_events WHERE event = 'succeeded' AND work_id IN \
         (SELECT work_id FROM work_events WHERE event = 'enqueued' AND kind = 'kvx.observe')",
    )
    .fetch_all(&pool)
    .await
    .expect("events");
    let batches: Vec<usize> = calls
        .iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|c| c.as_str()?.split(" batch=").nth(1)?.parse().ok())
        .collect();
    let largest = batches.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{} drift checks, the largest batch observed {largest} machines in one call",
        batches.len()
    );
    assert!(largest > 1, "drift checks were observed one call each");

    // A check that finds an instance as recorded writes nothing to it (no row version, no
    // Watch notification): its row is the same before and after two more checks.
    let quiet = names
        .iter()
        .find(|n| !failed.contains(*n) && **n != victim)
        .expect("another ready instance");
    let quiet_uid: uuid::Uuid = uids[quiet].parse().expect("uid");
    let row_version = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT xmin::text || '/' || updated_at::text FROM instances WHERE id = $1",
        )
        .bind(quiet_uid)
        .fetch_one(&pool)
        .await
        .expect("row")
    };
    let checks = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM work_events WHERE event = 'succeeded' AND work_id IN \
             (SELECT work_id FROM work_events WHERE event = 'enqueued' AND kind = 'kvx.observe' \
              AND resource_id = $1)",
        )
        .bind(quiet_uid)
        .fetch_one(&pool)
        .await
        .expect("checks")
    };
    let (before, checked) = (row_version().await, checks().await);
    common::wait_for("two more checks of an unchanged instance", || async {
        (checks().await >= checked + 2).then_some(())
    })
    .await;
    assert_eq!(
        row_version().await,
        before,
        "a check that found no change wrote"
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The engine killed (SIGKILL) at exact points of the EC2 step: before `RunInstances`, right
/// after it returned, and after the handler finished but before its completion committed. Each
/// time the retry adopts what the killed attempt made: exactly one EC2 instance, recorded on
/// the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_at_each_point_of_the_ec2_step_leaves_exactly_one_machine() {
    let dir = tmp("failpoints");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let (moto, smtp, k8s) = (peers.moto.clone(), peers.smtp.clone(), &peers.k8s);
    let api_port = free_port();
    let flags: Vec<String> = [
        "--database-url",
        &db.url,
        "--ec2-endpoint",
        &moto,
        "--smtp",
        &smtp,
        "--kubernetes-url",
        &k8s.url(),
        "--lease",
        "2s",
        "--poll-interval",
        "100ms",
        "--listen",
        &format!("127.0.0.1:{api_port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, point) in [
        "ec2.before-run-instances",
        "ec2.after-run-instances",
        "worker.before-complete",
    ]
    .into_iter()
    .enumerate()
    {
        let (engine, info) = start_dev_env(&dir, &flags, &[("SETPOINT_FAILPOINTS", point)]).await;
        let mut api = client(&info).await;
        let name = format!("fp-{i}");
        let created = create(&mut api, &name).await.expect("create");
        let marker = setpoint_adapter::failpoint::marker(point);
        common::wait_for(&format!("the engine to reach {point}"), || {
            let log = dir.join("dev.log");
            let marker = marker.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains(&marker))
                    .map(|_| ())
            }
        })
        .await;
        drop(engine); // SIGKILL to the whole process group
        let _ = std::fs::write(dir.join("dev.log"), "");
        let (engine, info) = start_dev(&dir, &flags).await;
        let mut api = client(&info).await;
        wait_status(&mut api, std::slice::from_ref(&name), InstanceStatus::Ready).await;
        let got = get(&mut api, &name).await.expect("instance");
        let machines = machines(&moto);
        let mine = machines.get(&created.uid).cloned().unwrap_or_default();
        assert_eq!(mine.len(), 1, "{point}: machines of {name}: {mine:?}");
        let observed = got.observed.expect("observed");
        use prost_types::value::Kind;
        let recorded = match observed.fields.get("machine").and_then(|m| m.kind.as_ref()) {
            Some(Kind::StructValue(m)) => {
                match m.fields.get("instance_id").and_then(|v| v.kind.as_ref()) {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                }
            }
            _ => None,
        };
        assert!(
            recorded.as_deref().is_some_and(|id| id.starts_with("i-")),
            "{point}: the machine is not recorded on the resource: {observed:?}"
        );
        drop(engine);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
