//! Batched drift against moto (issue 19): a sweep of N READY KVX instances (default 5,000,
//! `SETPOINT_SWEEP_TEST_N`) observes their machines with one `DescribeInstances` per 200
//! launch tokens, and a machine terminated behind setpoint's back is found in that sweep and
//! healed.
//!
//! The machines really exist in moto, launched with exactly the parameters and tags of a
//! machine the engine launched itself, and the rows carry what the engine recorded for that
//! machine; only the way they got there is short-cut. Creating 5,000 instances through the
//! engine costs about five EC2 calls each, and moto's `RunInstances` and every filtered
//! `DescribeInstances` scan all the instances of their region: at 5,000 machines in one region
//! the launches alone took minutes of moto's CPU. So:
//! - one instance (`template`) is created through the API and the engine; its machine in moto
//!   and its row are the template; then it is deleted through the API;
//! - N machines are launched directly in moto, 200 per region (see [`REGIONS`] for why), each with the template machine's image, type, data volume and tags, the tags
//!   naming its own resource and launch token, as the adapter writes them;
//! - N rows are written by the bench's bulk fill (`instances_fill_ready`: READY, placed on
//!   the drift ring where the kind's cursor stands, so that every first check is due at once),
//!   with the template's spec (in the machine's region) and the machine recorded as the
//!   template's was.
//!
//! One machine is terminated directly in moto before the rows are committed. The engine
//! (`setpoint dev`, EC2 through a counting proxy) then runs its drift round: the test counts
//! the calls per EC2 `Action` from the commit until every instance has been observed, and
//! asserts that every machine was asked for, that the sweep's `DescribeInstances` calls are at
//! most one per 200 machines of each region (each region is a batch key of its own; 25 for
//! 5,000) plus [`SLACK`], and the volume describes likewise; that the terminated machine was
//! found (its heal launched a new machine and the instance is READY again) and that no other
//! instance was healed.
//!
//! Nothing asserts on speed: the timings are printed (`--nocapture`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::awsproxy::{AwsProxy, Call};
use common::peers::{Peers, python_json};
use common::stack::{
    TmpDir, client_as, client_for, create_small, ec2_region, get, start_dev, wait_status,
};
use common::wait_for;
use serde_json::{Value, json};
use setpoint::api::proto::{DeleteInstanceRequest, InstanceStatus};
use setpoint::store::drift::drift_schedule_fill;
use setpoint::store::instances::{Fill, instances_fill_ready};
use setpoint_adapter::IdempotencyToken;
use sqlx::PgPool;
use uuid::Uuid;

/// The regions the machines are spread over, 200 per region. moto's filtered
/// `DescribeInstances` (and `RunInstances`) look each machine of the region up in a list of
/// the tags moto holds, a cost that grows with the square of the machines: at 5,000 machines
/// (1,000 per region) one `DescribeInstances` took 6–7 s of moto's CPU whatever the number of
/// tokens asked for. Fewer machines per region make each call cheaper.
const REGIONS: [&str; 25] = [
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "af-south-1",
    "me-south-1",
    "me-central-1",
    "il-central-1",
    "ap-south-1",
    "ap-east-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
];

/// Launch tokens per `DescribeInstances` (the adapter's `VALUES_PER_FILTER`, and the
/// `StepDecl::batched` of KVX's observe step).
const PER_CALL: usize = 200;

/// Describes the sweep may make beyond one per 200 machines of each region: a gathering is
/// called before it is full when the claims that would fill it come slower than the batch
/// window (the tail of a round), and a transient error retries a batch.
const SLACK: usize = 3;

/// The tenant of the seeded instances (`instances_fill_ready` appends the tenant number).
const SEEDED_TENANT: &str = "sweep0";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Launches the seeded machines in moto like the template machine: its image, instance type,
/// data volume (device, size, type, encryption, delete on termination) and tags, with the
/// values naming the template's resource, token, tenant replaced by the machine's own.
/// Prints `{resource id: {instance_id, private_ip, availability_zone, volume_id}}`.
const SEED: &str = r#"
import boto3, json, sys, concurrent.futures as cf
from botocore.config import Config
endpoint, plan_path = sys.argv[1], sys.argv[2]
plan = json.load(open(plan_path))
config = Config(max_pool_connections=32, retries={'max_attempts': 10, 'mode': 'standard'})
clients = {}
def client(region):
    if region not in clients:
        clients[region] = boto3.client('ec2', endpoint_url=endpoint, region_name=region,
            aws_access_key_id='testing', aws_secret_access_key='testing', config=config)
    return clients[region]
t = plan['template']
tc = client(t['region'])
ti = tc.describe_instances(InstanceIds=[t['instance_id']])['Reservations'][0]['Instances'][0]
itags = {x['Key']: x['Value'] for x in ti.get('Tags', [])}
bdm = next(b for b in ti['BlockDeviceMappings'] if b['Ebs']['VolumeId'] == t['volume_id'])
device, delete_on_termination = bdm['DeviceName'], bdm['Ebs'].get('DeleteOnTermination', False)
tv = tc.describe_volumes(VolumeIds=[t['volume_id']])['Volumes'][0]
vtags = {x['Key']: x['Value'] for x in tv.get('Tags', [])}
def own(tags, m):
    def sub(v):
        return (v.replace(t['resource_id'], m['id']).replace(t['token'], m['token'])
                 .replace(t['tenant'], m['tenant']))
    return [{'Key': k, 'Value': sub(v)} for k, v in tags.items()]
def launch(m):
    r = client(m['region']).run_instances(
        ClientToken=m['token'], ImageId=ti['ImageId'], InstanceType=ti['InstanceType'],
        MinCount=1, MaxCount=1,
        BlockDeviceMappings=[{'DeviceName': device, 'Ebs': {
            'VolumeSize': tv['Size'], 'VolumeType': tv['VolumeType'],
            'DeleteOnTermination': delete_on_termination, 'Encrypted': tv['Encrypted']}}],
        TagSpecifications=[{'ResourceType': 'instance', 'Tags': own(itags, m)},
                           {'ResourceType': 'volume', 'Tags': own(vtags, m)}])
    i = r['Instances'][0]
    mappings = i.get('BlockDeviceMappings') or client(m['region']).describe_instances(
        InstanceIds=[i['InstanceId']])['Reservations'][0]['Instances'][0]['BlockDeviceMappings']
    volume = next(b['Ebs']['VolumeId'] for b in mappings if b['DeviceName'] == device)
    return m['id'], {'instance_id': i['InstanceId'], 'private_ip': i.get('PrivateIpAddress'),
                     'availability_zone': i['Placement']['AvailabilityZone'], 'volume_id': volume}
with cf.ThreadPoolExecutor(8) as pool:
    print(json.dumps(dict(pool.map(launch, plan['machines']))))
"#;

/// Terminates the live machines carrying launch token `argv[3]` in region `argv[2]`.
const TERMINATE: &str = r#"
import boto3, json, sys
ec2 = boto3.client('ec2', endpoint_url=sys.argv[1], region_name=sys.argv[2],
                   aws_access_key_id='testing', aws_secret_access_key='testing')
ids = [i['InstanceId'] for r in ec2.describe_instances(Filters=[
           {'Name': 'tag:setpoint:token', 'Values': [sys.argv[3]]}])['Reservations']
       for i in r['Instances']]
ec2.terminate_instances(InstanceIds=ids)
print(json.dumps(ids))
"#;

/// The resources among `ids` whose drift check (`kvx.observe`) succeeded since event `after`,
/// and how many of those checks failed.
async fn observed(pool: &PgPool, ids: &[Uuid], after: i64) -> (BTreeSet<Uuid>, i64) {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT q.resource_id, e.event FROM work_events q
         JOIN work_events e ON e.work_id = q.work_id AND e.event IN ('succeeded', 'failed')
         WHERE q.event = 'enqueued' AND q.kind = 'kvx.observe' AND q.id > $2
           AND q.resource_id = ANY($1)",
    )
    .bind(ids)
    .bind(after)
    .fetch_all(pool)
    .await
    .expect("observe events");
    let failed = rows.iter().filter(|(_, e)| e == "failed").count() as i64;
    let done = rows
        .into_iter()
        .filter(|(_, e)| e == "succeeded")
        .map(|(id, _)| id)
        .collect();
    (done, failed)
}

/// Calls per `Action`.
fn by_action(calls: &[&Call]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in calls {
        *out.entry(c.action.clone()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_observes_200_machines_per_describe_and_finds_the_terminated_one() {
    let n = env_number("SETPOINT_SWEEP_TEST_N", 5_000);
    // 200 machines per region (see `REGIONS`), as many regions as that takes.
    let regions = &REGIONS[..n.div_ceil(PER_CALL).clamp(1, REGIONS.len())];
    let started = Instant::now();
    let dir = TmpDir::new("sweep");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let peers = Peers::start(&dir).await;
    let proxy = AwsProxy::counting(peers.moto.clone()).await;
    // A drift interval longer than the sweep: the rows are due at once, and each is due again
    // only an interval after its check, so the sweep is not mixed with a second one.
    let interval = std::env::var("SETPOINT_SWEEP_TEST_INTERVAL").unwrap_or_else(|_| "300s".into());
    let flags: Vec<String> = [
        "--database-url",
        &db.url,
        "--ec2-endpoint",
        &proxy.url(),
        "--smtp",
        &peers.smtp,
        "--kubernetes-url",
        &peers.k8s.url(),
        "--regions",
        &regions.join(","),
        // Every region's describe reaches moto at once, and moto answers them one after the
        // other, each in time proportional to its region's machines times every tag it holds
        // (about 6 s at 5,000 machines): the last answers take minutes.
        "--ec2-attempt-timeout",
        "600s",
        "--resync-interval",
        &interval,
        // The orphan sweep lists every region's machines: not during this test.
        "--orphans-interval",
        "1h",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (_engine, info) = start_dev(&dir, &flags, &[]).await;
    let api = client_as(&info, "tenant_token").await;

    // The template: one instance created and deleted through the engine.
    create_small(&api, "template", REGIONS[0]).await;
    let template = wait_status(&api, "template", InstanceStatus::Ready, 1).await;
    let template_id: Uuid = template.uid.parse().expect("uid");
    let (spec, spec_version, template_observed): (Value, i32, Value) =
        sqlx::query_as("SELECT spec, spec_version, observed FROM instances WHERE id = $1")
            .bind(template_id)
            .fetch_one(&db.pool)
            .await
            .expect("template row");
    let machine = template_observed["machine"].clone();
    let seed_plan = |machines: Vec<Value>| {
        json!({
            "template": {
                "region": REGIONS[0],
                "instance_id": machine["instance_id"],
                "volume_id": machine["data_volume"]["volume_id"],
                "resource_id": template_id.to_string(),
                "token": machine["launch_token"],
                "tenant": "demo",
            },
            "machines": machines,
        })
    };
    assert!(
        machine["instance_id"]
            .as_str()
            .is_some_and(|i| i.starts_with("i-"))
            && machine["data_volume"]["volume_id"].is_string(),
        "the template records its machine and data volume: {template_observed}"
    );
    let created = started.elapsed();

    // The seeded fleet, in one transaction: rows (READY, first check due at once) that become
    // visible only once their machines exist and are recorded.
    let mut tx = db.pool.begin().await.expect("begin");
    let ids = instances_fill_ready(
        &mut tx,
        Fill {
            kind: "kvx.instance",
            spec: &spec,
            tenant_prefix: "sweep",
            tenants: 1,
            name_prefix: "m-",
            from: 0,
            n: n as i64,
        },
    )
    .await
    .expect("fill");
    drift_schedule_fill(&mut tx, "kvx.instance", &ids)
        .await
        .expect("schedule");
    let plan: Vec<(Uuid, &str, IdempotencyToken)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let region = regions[i * regions.len() / n];
            (*id, region, IdempotencyToken::generate().derive("machine"))
        })
        .collect();
    let plan_file = dir.join("seed.json");
    std::fs::write(
        &plan_file,
        seed_plan(
            plan.iter()
                .map(|(id, region, token)| {
                    json!({"id": id, "region": region, "token": token.as_str(),
                           "tenant": SEEDED_TENANT})
                })
                .collect(),
        )
        .to_string(),
    )
    .expect("plan");
    let moto = peers.moto.clone();
    let plan_path = plan_file.display().to_string();
    let launched = tokio::task::spawn_blocking(move || python_json(SEED, &[&moto, &plan_path]))
        .await
        .expect("seed");
    let mut specs = Vec::with_capacity(n);
    let mut observed_states = Vec::with_capacity(n);
    for (id, region, token) in &plan {
        let m = &launched[id.to_string()];
        let mut machine = machine.clone();
        for key in ["instance_id", "private_ip", "availability_zone"] {
            machine[key] = m[key].clone();
        }
        machine["launch_token"] = json!(token.as_str());
        machine["region"] = json!(region);
        machine["data_volume"]["volume_id"] = m["volume_id"].clone();
        let mut spec = spec.clone();
        spec["region"] = json!(region);
        specs.push(spec);
        // What the observe step reads (the machine) and the conditions of a READY instance.
        observed_states.push(json!({
            "machine": machine,
            "conditions": template_observed["conditions"],
        }));
    }
    sqlx::query(
        "UPDATE instances i SET spec = u.spec, observed = u.observed, spec_version = $4
         FROM unnest($1::uuid[], $2::jsonb[], $3::jsonb[]) AS u(id, spec, observed)
         WHERE i.id = u.id",
    )
    .bind(&ids)
    .bind(&specs)
    .bind(&observed_states)
    .bind(spec_version)
    .execute(&mut *tx)
    .await
    .expect("record machines");
    let seeded = started.elapsed();

    // The template leaves through the engine (its check is not part of the sweep).
    api.clone()
        .delete_instance(DeleteInstanceRequest {
            name: "tenants/demo/instances/template".into(),
            request_id: "delete-template".into(),
            bulk: false,
        })
        .await
        .expect("delete template");
    wait_for("the template to be deleted", || {
        let api = api.clone();
        async move {
            get(&api, "template")
                .await
                .is_none_or(|i| i.status == InstanceStatus::Deleted as i32)
                .then_some(())
        }
    })
    .await;

    // Behind setpoint's back: one machine terminated before anyone looks.
    let victim = n / 2;
    let (victim_id, victim_region, victim_token) = plan[victim].clone();
    let terminated = python_json(
        TERMINATE,
        &[&peers.moto, victim_region, victim_token.as_str()],
    );
    assert_eq!(terminated.as_array().map(Vec::len), Some(1), "{terminated}");
    let after_event: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM work_events")
        .fetch_one(&db.pool)
        .await
        .expect("last event");
    // Every row's place on the drift ring is where the kind's cursor stands (locked until the
    // commit, so no round moves it meanwhile): the first round after the commit passes them
    // all, and the next pass comes an interval later, so the sweep is not mixed with a second.
    let interval_us = setpoint::config::parse_duration(&interval)
        .expect("interval")
        .as_micros() as i64;
    let placed = sqlx::query(
        "WITH c AS (SELECT through FROM drift_cursors WHERE kind = 'kvx.instance' FOR UPDATE)
         UPDATE drift_schedule s
         SET phase = least(((extract(epoch FROM c.through) * 1000000)::bigint % $2)::float8
                           / $2 + 1e-9, 0.999999999)
         FROM c WHERE s.resource_id = ANY($1)",
    )
    .bind(&ids)
    .bind(interval_us)
    .execute(&mut *tx)
    .await
    .expect("places");
    assert_eq!(
        placed.rows_affected(),
        n as u64,
        "the engine's drift cursor exists"
    );
    let mark = proxy.snapshot().len();
    tx.commit().await.expect("commit");
    let committed = Instant::now();

    // The sweep: until every instance was observed once.
    let mut last_print = Instant::now();
    let done_at = loop {
        let (done, failed) = observed(&db.pool, &ids, after_event).await;
        if done.len() == n {
            break Instant::now();
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "{} of {n} observed, {failed} checks failed, {:.0} s after the commit",
                done.len(),
                committed.elapsed().as_secs_f64()
            );
        }
        assert!(
            committed.elapsed() < Duration::from_secs(600),
            "only {} of {n} instances observed",
            done.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let calls = proxy.snapshot();
    let window: Vec<&Call> = calls[mark..].iter().filter(|c| c.at <= done_at).collect();
    let seeded_tokens: BTreeSet<&str> = plan.iter().map(|(_, _, t)| t.as_str()).collect();
    // The sweep's describes: those asking for seeded launch tokens only (the victim's heal
    // looks for its own new token meanwhile).
    let sweep: Vec<&Call> = window
        .iter()
        .copied()
        .filter(|c| {
            let tokens = c.filter("tag:setpoint:token");
            c.action == "DescribeInstances"
                && !tokens.is_empty()
                && tokens.iter().all(|t| seeded_tokens.contains(t.as_str()))
        })
        .collect();
    let mut asked: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &sweep {
        for t in c.filter("tag:setpoint:token") {
            *asked.entry(t.as_str()).or_default() += 1;
        }
    }
    let sizes: Vec<usize> = sweep
        .iter()
        .map(|c| c.filter("tag:setpoint:token").len())
        .collect();
    let volume_calls = |action: &str| window.iter().filter(|c| c.action == action).count();
    let mut machines_per_region: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, region, _) in &plan {
        *machines_per_region.entry(region).or_default() += 1;
    }
    // Each region's checks are a batch key of their own: a region whose count is not a
    // multiple of 200 ends with a partial call.
    let full_calls: usize = machines_per_region
        .values()
        .map(|m| m.div_ceil(PER_CALL))
        .sum();
    let bound = full_calls + SLACK;
    println!(
        "N = {n} over {} regions: template created in {:.1} s, {n} machines seeded in {:.1} s; \
         sweep: every instance observed {:.1} s after the commit",
        regions.len(),
        created.as_secs_f64(),
        (seeded - created).as_secs_f64(),
        done_at.duration_since(committed).as_secs_f64()
    );
    println!(
        "EC2 calls during the sweep, by action: {:?}",
        by_action(&window)
    );
    println!(
        "sweep DescribeInstances: {} ({} of them next pages; bound: {full_calls} (one per \
         {PER_CALL} machines per region, ⌈{n}/{PER_CALL}⌉ = {}) + {SLACK} = {bound}), \
         tokens per call {sizes:?}; DescribeVolumes {}, DescribeVolumesModifications {}",
        sweep.len(),
        sweep.iter().filter(|c| c.next_page).count(),
        n.div_ceil(PER_CALL),
        volume_calls("DescribeVolumes"),
        volume_calls("DescribeVolumesModifications"),
    );
    let batches: Vec<Value> = sqlx::query_scalar(
        "SELECT e.detail->'calls' FROM work_events q
         JOIN work_events e ON e.work_id = q.work_id AND e.event = 'succeeded'
         WHERE q.event = 'enqueued' AND q.kind = 'kvx.observe' AND q.id > $1",
    )
    .bind(after_event)
    .fetch_all(&db.pool)
    .await
    .expect("calls");
    let mut batch_sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for size in batches
        .iter()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(|c| c.as_str()?.split(" batch=").nth(1)?.parse::<usize>().ok())
    {
        *batch_sizes.entry(size).or_default() += 1;
    }
    println!("checks by the size of the batch they were observed in: {batch_sizes:?}");

    assert_eq!(
        asked.len(),
        n,
        "every seeded machine was asked for by the sweep's describes"
    );
    assert!(
        sweep.len() <= bound,
        "{} DescribeInstances for {n} machines (at most {bound}): tokens per call {sizes:?}",
        sweep.len()
    );
    for action in ["DescribeVolumes", "DescribeVolumesModifications"] {
        assert!(
            volume_calls(action) <= bound,
            "{} {action} calls during the sweep (at most {bound})",
            volume_calls(action)
        );
    }

    // The terminated machine was found: its check started the heal, which launched a new
    // machine, and the instance is READY again. No other instance was healed.
    let healed: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT resource_id FROM work_events
         WHERE event = 'enqueued' AND kind LIKE 'kvx.heal.%' AND id > $1",
    )
    .bind(after_event)
    .fetch_all(&db.pool)
    .await
    .expect("heals");
    assert_eq!(healed, vec![victim_id], "only the victim is healed");
    wait_for("the victim's machine to be replaced", || {
        let moto = peers.moto.clone();
        let uid = victim_id.to_string();
        async move {
            let region = tokio::task::spawn_blocking(move || ec2_region(&moto, victim_region))
                .await
                .ok()?;
            let states: Vec<String> = region.of(&uid).iter().map(|i| i.state.clone()).collect();
            (states.len() == 2 && states.iter().any(|s| s == "running")).then_some(())
        }
    })
    .await;
    let token = setpoint::api::auth::create_token(&db.pool, SEEDED_TENANT, false, None)
        .await
        .expect("token");
    let server = info["server"].as_str().expect("server");
    let seeded_api = client_for(server, &token.token).await;
    let name = format!("m-{victim}");
    let healed = wait_for("the victim to be READY again", || {
        let api = seeded_api.clone();
        let name = name.clone();
        async move {
            let full = format!("tenants/{SEEDED_TENANT}/instances/{name}");
            let i = api
                .clone()
                .get_instance(setpoint::api::proto::GetInstanceRequest { name: full })
                .await
                .ok()?
                .into_inner();
            (i.status == InstanceStatus::Ready as i32).then_some(i)
        }
    })
    .await;
    let healed_machine = common::stack::observed(&healed)["machine"]["instance_id"].clone();
    assert_ne!(
        healed_machine,
        launched[victim_id.to_string()]["instance_id"],
        "the victim records its new machine"
    );
    println!(
        "the victim {name} was healed onto {healed_machine}; the test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
