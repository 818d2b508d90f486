//! Upgrade from the previous release (92f679c): its database, as `scripts/upgrade-check.sh
//! fixture` wrote it with that release's binary and dumped it (tests/fixtures/
//! upgrade-92f679c.sql), is restored into a fresh database, migrated by this release (`setpoint
//! migrate`, then the engine's own start), and driven through this release's API on the dev
//! stack's peers (moto, aiosmtpd, the Kubernetes test server).
//!
//! moto keeps its state in memory, so the machines the previous release launched are launched
//! again for the test the way that release launched them (in its one region, us-east-1, tagged
//! with the launching unit's token and the instance, without a data volume), and the restored
//! records are pointed at them: the cloud as the previous release left it.
//!
//! The engine serves `us-west-2,us-east-1`, in that order: its first (home) region is not the
//! one the previous release ran in, as after an upgrade that adds a region ahead of the old one
//! (`[ec2.regions.*]` tables are taken in name order).
//!
//! Checked: statuses and real regions survive the migration; the unit the previous release
//! left queued runs; its parked unit is retried by an operator and finishes; its instances
//! update (plan and size) and delete normally, on their machines where they are (one machine
//! each, never a second one in another region); a deleted name can be used again; a new
//! instance lands in its region; and `setpoint migrate --contract` runs after all that, with
//! the engine still working.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::peers::{Peers, Proc, free_port};
use common::stack::{
    Api, TmpDir, client_as, ec2_region, full, get, kill9, observed, start_dev, wait_status,
};
use common::{setpoint, wait_for};
use serde_json::{Value, json};
use setpoint::api::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, Instance, InstanceSpec, InstanceStatus,
    UpdateInstanceRequest,
};
use sqlx::PgPool;

/// The fixture, relative to the package.
const FIXTURE: &str = "tests/fixtures/upgrade-92f679c.sql";
/// The one region of the previous release's dev stack.
const OLD_REGION: &str = "us-east-1";

/// A new database on the test cluster, restored from the fixture with psql: its URL and pool.
async fn restore_fixture() -> (setpoint::dev::testdb::TestDb, String, PgPool) {
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let name = format!("upgrade_{}", uuid::Uuid::new_v4().simple());
    let base = db
        .url
        .rsplit_once('/')
        .map(|(base, _)| base.to_owned())
        .expect("a database URL");
    let admin = setpoint::store::connect(&format!("{base}/postgres"), 1)
        .await
        .expect("admin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} TEMPLATE template0"
    )))
    .execute(&admin)
    .await
    .expect("create database");
    admin.close().await;
    let url = format!("{base}/{name}");
    let fixture = common::package_dir().join(FIXTURE);
    let out = Command::new("psql")
        .args([&url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&fixture)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "restoring {}: {}",
        fixture.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = setpoint::store::connect(&url, 4).await.expect("pool");
    (db, url, pool)
}

/// (name, status, spec region, generation) of every instance.
async fn instances(pool: &PgPool) -> Vec<(String, String, String, i64)> {
    sqlx::query_as("SELECT name, status, spec->>'region', generation FROM instances ORDER BY name")
        .fetch_all(pool)
        .await
        .expect("instances")
}

/// Launches again, in moto, the machine of every live instance of the fixture, as the
/// previous release launched it (its region, its tags, no data volume), and points the
/// instance's record at it. Returns name → machine id.
async fn relaunch_old_machines(pool: &PgPool, moto: &str) -> BTreeMap<String, String> {
    let rows: Vec<(String, String, String, Value)> = sqlx::query_as(
        "SELECT id::text, tenant, name, observed->'machine' FROM instances
         WHERE deleted_at IS NULL AND observed ? 'machine' ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .expect("machines");
    let wanted: Vec<Value> = rows
        .iter()
        .map(|(uid, tenant, name, m)| {
            json!({
                "uid": uid, "tenant": tenant, "name": name,
                "token": m["launch_token"], "type": m["instance_type"],
            })
        })
        .collect();
    let script = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = {}
for m in json.loads(sys.argv[3]):
    tags = [{'Key': k, 'Value': v} for k, v in [
        ('setpoint:token', m['token']), ('setpoint:instance-id', m['uid']),
        ('setpoint:tenant', m['tenant']), ('setpoint:managed', 'true'),
        ('Name', 'kvx-%s-%s' % (m['tenant'], m['name']))]]
    r = ec2.run_instances(ImageId='ami-12c6146b', InstanceType=m['type'] or 't3.small',
                          MinCount=1, MaxCount=1, ClientToken=m['token'],
                          TagSpecifications=[{'ResourceType': 'instance', 'Tags': tags}])
    out[m['name']] = r['Instances'][0]['InstanceId']
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            moto,
            OLD_REGION,
            &serde_json::to_string(&wanted).expect("json"),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).expect("json");
    for (name, id) in &ids {
        sqlx::query(
            "UPDATE instances SET observed = jsonb_set(observed, '{machine,instance_id}', to_jsonb($2::text))
             WHERE name = $1 AND deleted_at IS NULL",
        )
        .bind(name)
        .bind(id)
        .execute(pool)
        .await
        .expect("point the record at the machine");
    }
    ids
}

/// `setpoint dev` of this release on the test's peers and the restored database.
async fn start_engine(dir: &Path, url: &str, peers: &Peers, port: u16) -> (Proc, Api) {
    let extra: Vec<String> = [
        "--database-url",
        url,
        "--ec2-endpoint",
        &peers.moto,
        "--smtp",
        &peers.smtp,
        "--kubernetes-url",
        &peers.k8s.url(),
        "--regions",
        "us-west-2,us-east-1",
        "--lease",
        "2s",
        "--poll-interval",
        "100ms",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (proc, info) = start_dev(dir, &extra, &[]).await;
    (proc, client_as(&info, "admin_token").await)
}

fn spec(plan: &str, region: &str, size_gb: i32) -> InstanceSpec {
    InstanceSpec {
        plan: plan.into(),
        region: region.into(),
        size_gb,
        owner_email: "owner@example.com".into(),
    }
}

async fn update(api: &Api, name: &str, spec: InstanceSpec) {
    api.clone()
        .update_instance(UpdateInstanceRequest {
            instance: Some(Instance {
                name: full(name),
                spec: Some(spec),
                ..Instance::default()
            }),
            update_mask: None,
            request_id: format!("upgrade-update-{name}"),
        })
        .await
        .unwrap_or_else(|e| panic!("update {name}: {e:?}"));
}

async fn delete(api: &Api, name: &str) {
    api.clone()
        .delete_instance(DeleteInstanceRequest {
            name: full(name),
            request_id: format!("upgrade-delete-{name}-{}", uuid::Uuid::new_v4().simple()),
        })
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e:?}"));
}

async fn create(api: &Api, name: &str, region: &str) {
    api.clone()
        .create_instance(CreateInstanceRequest {
            parent: "tenants/demo".into(),
            instance_id: name.into(),
            instance: Some(Instance {
                spec: Some(spec("kvx.small", region, 10)),
                ..Instance::default()
            }),
            request_id: format!("upgrade-create-{name}"),
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
}

async fn wait_deleted(api: &Api, name: &str) {
    wait_for(&format!("{name} to be deleted"), || async move {
        match get(api, name).await {
            None => Some(()),
            Some(i) => (i.status == InstanceStatus::Deleted as i32).then_some(()),
        }
    })
    .await
}

/// The condition `kind` of `instance`.
fn condition(instance: &Instance, kind: &str) -> Value {
    observed(instance)["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

/// The machines of instance `uid`, per region: (id, state, type).
fn machines_of(moto: &str, uid: &str) -> BTreeMap<&'static str, Vec<(String, String, String)>> {
    ["us-east-1", "us-west-2"]
        .into_iter()
        .map(|r| {
            let seen = ec2_region(moto, r);
            let mine = seen
                .of(uid)
                .into_iter()
                .map(|i| (i.id.clone(), i.state.clone(), i.instance_type.clone()))
                .collect();
            (r, mine)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_release_migrates_and_its_instances_live_on() {
    let dir = TmpDir::new("upgrade");
    let (_db, url, pool) = restore_fixture().await;
    let before = instances(&pool).await;
    let status = |name: &str| {
        before
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, s, ..)| s.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (
            status("ready-1"),
            status("west-1"),
            status("updating-1"),
            status("parked-1"),
            status("deleted-1")
        ),
        (
            "READY".into(),
            "READY".into(),
            "UPDATING".into(),
            "FAILED".into(),
            "DELETED".into()
        ),
        "the fixture: {before:?}"
    );
    let old_units: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT id, kind, state::text FROM work ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("units");
    eprintln!("units of the previous release: {old_units:?}");

    // This release's expand migrations, as an operator runs them before the rollout.
    let (ok, out, err) = setpoint(Some(&url), &["migrate"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("setpoint migrate --contract"),
        "expand only: {out}"
    );
    let after = instances(&pool).await;
    assert_eq!(
        after, before,
        "names, statuses, regions and generations are kept"
    );
    let kinds: Vec<String> = sqlx::query_scalar("SELECT DISTINCT kind FROM instances")
        .fetch_all(&pool)
        .await
        .expect("kinds");
    assert_eq!(kinds, ["kvx.instance"]);

    let peers = Peers::start(&dir).await;
    let moto = peers.moto.clone();
    let machines = relaunch_old_machines(&pool, &moto).await;
    assert_eq!(machines.len(), 4, "{machines:?}");
    let uid = |name: &str| {
        let name = name.to_owned();
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT id::text FROM instances WHERE name = $1 AND deleted_at IS NULL",
            )
            .bind(&name)
            .fetch_one(&pool)
            .await
            .expect("uid")
        }
    };
    let port = free_port();
    let (mut engine, api) = start_engine(&dir, &url, &peers, port).await;

    // The unit the previous release left queued runs here: updating-1 finishes its update.
    let updated = wait_status(&api, "updating-1", InstanceStatus::Ready, 2).await;
    assert_eq!(updated.spec.as_ref().map(|s| s.size_gb), Some(15));

    // Its parked unit is retried by an operator, and the update finishes.
    let parked: Vec<i64> = sqlx::query_scalar(
        "SELECT w.id FROM work w JOIN instances i ON i.id = w.resource_id
         WHERE i.name = 'parked-1' AND w.state = 'parked'",
    )
    .fetch_all(&pool)
    .await
    .expect("parked");
    assert_eq!(parked.len(), 1, "parked-1 has its parked unit");
    let (ok, out, err) = setpoint(Some(&url), &["work", "retry", &parked[0].to_string()]);
    assert!(ok, "{out}{err}");
    wait_status(&api, "parked-1", InstanceStatus::Ready, 2).await;

    // The previous release's instances update: a plan change resizes their machine where it
    // runs (us-east-1, the real region, although west-1 asked for us-west-2 back then), and a
    // size change is taken.
    update(&api, "west-1", spec("kvx.large", "us-west-2", 20)).await;
    let west = wait_status(&api, "west-1", InstanceStatus::Ready, 2).await;
    let west_uid = uid("west-1").await;
    assert_eq!(
        machines_of(&moto, &west_uid),
        BTreeMap::from([
            (
                "us-east-1",
                vec![(
                    machines["west-1"].clone(),
                    "running".into(),
                    "t3.large".into()
                )]
            ),
            ("us-west-2", vec![]),
        ]),
        "west-1's machine is resized in place, in its real region"
    );
    assert_eq!(
        observed(&west)["machine"]["region"],
        OLD_REGION,
        "{}",
        observed(&west)
    );
    update(&api, "ready-1", spec("kvx.small", "us-east-1", 20)).await;
    let ready = wait_status(&api, "ready-1", InstanceStatus::Ready, 2).await;
    let ready_uid = uid("ready-1").await;
    assert_eq!(
        machines_of(&moto, &ready_uid)["us-east-1"],
        vec![(
            machines["ready-1"].clone(),
            "running".into(),
            "t3.small".into()
        )],
        "ready-1 keeps its one machine: {}",
        observed(&ready)
    );
    // Launched without a data volume, it cannot take the new size: the update says so and
    // finishes (nothing parked).
    let machine_condition = condition(&ready, "MachineAvailable");
    assert_eq!(
        (
            machine_condition["status"].as_str(),
            machine_condition["reason"].as_str()
        ),
        (Some("True"), Some("NoDataVolume")),
        "{machine_condition}"
    );
    assert!(
        machine_condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("no data volume") && m.contains("20")),
        "{machine_condition}"
    );

    // A deleted name is free again; a new instance lands in its own region.
    create(&api, "deleted-1", "us-east-1").await;
    create(&api, "fresh-1", "us-west-2").await;
    wait_status(&api, "deleted-1", InstanceStatus::Ready, 1).await;
    let fresh = wait_status(&api, "fresh-1", InstanceStatus::Ready, 1).await;
    assert_eq!(machines_of(&moto, &fresh.uid)["us-west-2"].len(), 1);

    // Every instance of the previous release deletes normally: its machine is terminated.
    let old_uids = [
        ("ready-1", ready_uid),
        ("west-1", west_uid),
        ("updating-1", uid("updating-1").await),
        ("parked-1", uid("parked-1").await),
    ];
    for (name, _) in &old_uids {
        delete(&api, name).await;
    }
    for (name, uid) in &old_uids {
        wait_deleted(&api, name).await;
        let m = machines_of(&moto, uid);
        assert_eq!(
            m["us-east-1"],
            vec![(
                machines[*name].clone(),
                "terminated".into(),
                m["us-east-1"][0].2.clone()
            )],
            "{name}: its one machine is terminated: {m:?}"
        );
        assert!(m["us-west-2"].is_empty(), "{name}: {m:?}");
    }
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM work WHERE state = 'parked'")
        .fetch_one(&pool)
        .await
        .expect("parked");
    assert_eq!(parked, 0, "nothing parked");

    // Once no engine of the previous release runs: the contract migrations, with this
    // release's engine running, which goes on working.
    let (ok, out, err) = setpoint(Some(&url), &["migrate", "--contract"]);
    assert!(ok, "{err}");
    assert!(out.contains("expand and contract"), "{out}");
    let contract: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM _sqlx_migrations WHERE version >= 1000 AND success",
    )
    .fetch_one(&pool)
    .await
    .expect("migrations");
    assert!(contract >= 1, "the contract migrations are recorded");
    for name in ["deleted-1", "fresh-1"] {
        delete(&api, name).await;
    }
    wait_deleted(&api, "deleted-1").await;
    wait_deleted(&api, "fresh-1").await;
    for region in ["us-east-1", "us-west-2"] {
        let seen = ec2_region(&moto, region);
        let live: Vec<_> = seen.instances.iter().filter(|i| i.live()).collect();
        assert!(live.is_empty(), "{region}: {live:?}");
    }
    kill9(&mut engine);
    drop(engine);
    drop(peers);
}
