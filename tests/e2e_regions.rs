//! Two regions against moto, through the gRPC API of `setpoint dev --regions
//! us-east-1,us-west-2` (on the test's own PostgreSQL, moto, aiosmtpd and Kubernetes test
//! server, so that the engine can be killed and started again on the same peers):
//!
//! - a Create in each region lands in that region of moto (DescribeInstances per region), with
//!   a data volume of the requested `size_gb` (DescribeVolumes), recorded on the instance;
//! - an update of only `size_gb` grows the same volume in place (ModifyVolume);
//! - a Create in a region no live engine serves is refused with FAILED_PRECONDITION naming the
//!   served regions, and writes nothing (no instance, no unit, no request id);
//! - a SIGKILL of the engine after moto shows the machines and before the instances are READY,
//!   then a restart on the same database, still gives exactly one machine (and one data volume)
//!   per instance, in its own region;
//! - after the deletes no machine runs and no volume is left in either region.
//!
//! Nothing here asserts on speed: every wait polls for a condition (with a generous limit that
//! only guards against a hung test).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::peers::{Peers, Proc, free_port};
use common::stack::{
    Api, Ec2Instance, TmpDir, client_as, ec2_region, full, get, kill9, observed, start_dev,
    wait_status,
};
use setpoint::api::proto::{
    CreateInstanceRequest, DeleteInstanceRequest, Instance, InstanceSpec, InstanceStatus,
    UpdateInstanceRequest,
};

const REGIONS: [&str; 2] = ["us-east-1", "us-west-2"];

fn spec(region: &str, size_gb: i32) -> InstanceSpec {
    InstanceSpec {
        plan: "kvx.small".into(),
        region: region.into(),
        size_gb,
        owner_email: "owner@example.com".into(),
    }
}

async fn create(
    api: &Api,
    name: &str,
    region: &str,
    size_gb: i32,
) -> Result<Instance, tonic::Status> {
    api.clone()
        .create_instance(CreateInstanceRequest {
            parent: "tenants/demo".into(),
            instance_id: name.into(),
            instance: Some(Instance {
                spec: Some(spec(region, size_gb)),
                ..Instance::default()
            }),
            request_id: format!("create-{name}"),
        })
        .await
        .map(|r| r.into_inner())
}

/// `setpoint dev` on the test's peers, serving both regions, its API on `port`.
async fn start_engine(dir: &Path, db: &str, peers: &Peers, port: u16) -> (Proc, Api) {
    let extra: Vec<String> = [
        "--database-url",
        db,
        "--ec2-endpoint",
        &peers.moto,
        "--smtp",
        &peers.smtp,
        "--kubernetes-url",
        &peers.k8s.url(),
        "--regions",
        &REGIONS.join(","),
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
    // The admin token of tenant demo: a failure's raw text says why a chain failed.
    (proc, client_as(&info, "admin_token").await)
}

/// The machines of resource `uid` in each region, terminated ones included.
fn machines(moto: &str, uid: &str) -> BTreeMap<&'static str, Vec<Ec2Instance>> {
    REGIONS
        .iter()
        .map(|r| {
            (
                *r,
                ec2_region(moto, r).of(uid).into_iter().cloned().collect(),
            )
        })
        .collect()
}

/// Waits until instance `name` is DELETED (or no longer listed).
async fn wait_deleted(api: &Api, name: &str) {
    common::wait_for(&format!("{name} to be deleted"), || async move {
        match get(api, name).await {
            None => Some(()),
            Some(i) => (i.status == InstanceStatus::Deleted as i32).then_some(()),
        }
    })
    .await
}

/// Checks that instance `got` (in `region`, with a data volume of `size_gb`) has exactly one
/// machine in moto, ever, running in its region and none in the other, with a data volume of
/// that size recorded on the instance; returns (machine id, volume id).
fn check_placed(moto: &str, got: &Instance, region: &str, size_gb: i32) -> (String, String) {
    let name = &got.name;
    let by_region = machines(moto, &got.uid);
    for (r, machines) in &by_region {
        let want = usize::from(*r == region);
        assert_eq!(
            machines.len(),
            want,
            "{name}: machines in {r}: {machines:?}"
        );
    }
    let machine = &by_region[region][0];
    assert_eq!(machine.state, "running", "{name}: {machine:?}");
    let obs = observed(got);
    let recorded = &obs["machine"];
    assert_eq!(
        recorded["instance_id"],
        machine.id.as_str(),
        "{name}: {obs}"
    );
    assert_eq!(recorded["region"], region, "{name}: {obs}");
    let volume_id = recorded["data_volume"]["volume_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no data volume recorded: {obs}"))
        .to_owned();
    // The size the volume has or is being given (a modification's target counts: the
    // provider may report the old size for a while after ModifyVolume).
    let volume = &recorded["data_volume"];
    let effective = volume["size_gb"]
        .as_f64()
        .into_iter()
        .chain(volume["modification"]["target_size_gb"].as_f64())
        .fold(0.0, f64::max);
    assert_eq!(effective, f64::from(size_gb), "{name}: {obs}");
    let seen = ec2_region(moto, region);
    let volume = seen
        .volume(&volume_id)
        .unwrap_or_else(|| panic!("{name}: volume {volume_id} is not in {region}"));
    assert_eq!(
        volume.size,
        i64::from(size_gb),
        "{name}: DescribeVolumes {volume:?}"
    );
    assert!(
        volume.attachments.iter().any(|(i, _)| *i == machine.id),
        "{name}: volume {volume_id} is attached to {}: {volume:?}",
        machine.id
    );
    assert!(
        machine.devices.iter().any(|(_, v)| *v == volume_id),
        "{name}: the machine's block devices name the volume: {machine:?}"
    );
    (machine.id.clone(), volume_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_place_size_grow_refuse_and_survive_a_sigkill() {
    let dir = TmpDir::new("e2e-regions");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let moto = peers.moto.clone();
    let port = free_port();
    let (mut engine, api) = start_engine(&dir, &db.url, &peers, port).await;

    // A Create in each region lands there, with its data volume.
    create(&api, "east", "us-east-1", 10)
        .await
        .expect("create east");
    create(&api, "west", "us-west-2", 20)
        .await
        .expect("create west");
    let east = wait_status(&api, "east", InstanceStatus::Ready, 1).await;
    let west = wait_status(&api, "west", InstanceStatus::Ready, 1).await;
    check_placed(&moto, &east, "us-east-1", 10);
    let (west_machine, west_volume) = check_placed(&moto, &west, "us-west-2", 20);

    // An update of only size_gb grows the same volume in place.
    api.clone()
        .update_instance(UpdateInstanceRequest {
            instance: Some(Instance {
                name: full("west"),
                spec: Some(spec("us-west-2", 30)),
                ..Instance::default()
            }),
            update_mask: None,
            request_id: "grow-west".into(),
        })
        .await
        .expect("grow west");
    let grown = wait_status(&api, "west", InstanceStatus::Ready, 2).await;
    let (machine, volume) = check_placed(&moto, &grown, "us-west-2", 30);
    assert_eq!(machine, west_machine, "the same machine");
    assert_eq!(volume, west_volume, "the same volume, grown in place");
    let modifications = ec2_region(&moto, "us-west-2").modifications;
    assert!(
        modifications.contains(&(west_volume.clone(), 30)),
        "ModifyVolume to 30 GiB: {modifications:?}"
    );

    // A region no live engine serves: refused, naming the served ones, and nothing written.
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    let before = (
        count("SELECT count(*) FROM instances").await,
        count("SELECT count(*) FROM work").await,
        count("SELECT count(*) FROM work_events").await,
        count("SELECT count(*) FROM api_requests").await,
    );
    let refused = create(&api, "far", "eu-west-1", 10)
        .await
        .expect_err("eu-west-1 is served by no engine");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    for r in REGIONS {
        assert!(
            refused.message().contains(r),
            "the refusal names served region {r}: {refused:?}"
        );
    }
    assert!(refused.message().contains("eu-west-1"), "{refused:?}");
    let after = (
        count("SELECT count(*) FROM instances").await,
        count("SELECT count(*) FROM work").await,
        count("SELECT count(*) FROM work_events").await,
        count("SELECT count(*) FROM api_requests").await,
    );
    assert_eq!(
        before, after,
        "(instances, work, events, request ids) unchanged"
    );
    let far: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE name = 'far' OR spec->>'region' = 'eu-west-1'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("far");
    assert_eq!(far, 0);
    let request: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_requests WHERE request_id = 'create-far'")
            .fetch_one(&db.pool)
            .await
            .expect("request");
    assert_eq!(request, 0, "no request id kept for the refused create");
    assert!(get(&api, "far").await.is_none());

    // SIGKILL between launch and completion. The Kubernetes step waits while rollouts are
    // held, so no instance can be READY yet; the engine is killed as soon as moto shows a
    // machine of the new instances, while the others may be anywhere in their EC2 step.
    peers.k8s.hold_rollouts(true);
    let crashed: Vec<(String, &str, i32)> = (0..4)
        .map(|i| (format!("crash-{i}"), REGIONS[i % 2], 10 + i as i32))
        .collect();
    let mut uids = BTreeMap::new();
    for (name, region, size) in &crashed {
        let made = create(&api, name, region, *size).await.expect("create");
        uids.insert(name.clone(), made.uid);
    }
    let seen = common::wait_for("moto to show a machine of the new instances", || {
        let moto = moto.clone();
        let uids = uids.clone();
        async move {
            let shown = tokio::task::spawn_blocking(move || {
                REGIONS
                    .iter()
                    .flat_map(|r| ec2_region(&moto, r).instances)
                    .filter(|i| i.resource().is_some_and(|r| uids.values().any(|u| u == r)))
                    .count()
            })
            .await
            .expect("join");
            (shown > 0).then_some(shown)
        }
    })
    .await;
    for (name, ..) in &crashed {
        let i = get(&api, name).await.expect("instance");
        assert_ne!(
            i.status,
            InstanceStatus::Ready as i32,
            "{name} cannot be READY while rollouts are held"
        );
    }
    kill9(&mut engine);
    drop(engine);
    eprintln!("killed the engine once moto showed {seen} machine(s)");
    peers.k8s.hold_rollouts(false);
    let (mut engine, api) = start_engine(&dir, &db.url, &peers, port).await;
    for (name, region, size) in &crashed {
        let got = wait_status(&api, name, InstanceStatus::Ready, 1).await;
        check_placed(&moto, &got, region, *size);
    }

    // Deletes leave no machine and no volume in either region.
    let mut all: Vec<String> = vec!["east".into(), "west".into()];
    all.extend(crashed.iter().map(|(n, ..)| n.clone()));
    for name in &all {
        api.clone()
            .delete_instance(DeleteInstanceRequest {
                name: full(name),
                request_id: format!("delete-{name}"),
            })
            .await
            .expect("delete");
    }
    for name in &all {
        wait_deleted(&api, name).await;
    }
    for region in REGIONS {
        let seen = ec2_region(&moto, region);
        let live: Vec<_> = seen.instances.iter().filter(|i| i.live()).collect();
        assert!(live.is_empty(), "{region}: machines left: {live:?}");
        assert!(
            seen.volumes.is_empty(),
            "{region}: volumes left: {:?}",
            seen.volumes
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM work WHERE holds_resource")
        .fetch_one(&db.pool)
        .await
        .expect("work");
    assert_eq!(left, 0, "no unit of a chain left");
    kill9(&mut engine);
    drop(engine);
    drop(peers);
}
