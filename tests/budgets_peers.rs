//! Shared request budgets (issue 19, docs/budgets.md) under throttling peers other than EC2:
//! the budgets of the SMTP relay (`send`) and of Route 53 (`change`), each configured above
//! what its peer allows, so that only AIMD — the peer's rate replies lowering the shared rate —
//! keeps two `setpoint serve` engines on one database under the peer's limit.
//!
//! - SMTP: an aiosmtpd relay (a handler written by the test) answers `451 4.7.0 rate limit
//!   exceeded` to `MAIL FROM` above R messages per second; N `email.send` units. Every message
//!   arrives exactly once (counted by `Message-ID` in the relay's Maildir), no unit parks, the
//!   relay's budget heard throttles and lowered its rate, and after the first 3 s fewer than
//!   10% of the transactions got the rate reply.
//! - Route 53: a proxy in front of moto answers Route 53's `Throttling` (HTTP 400,
//!   `ErrorResponse`) to `ChangeResourceRecordSets` above R calls per second; N `dns.zone`
//!   resources created through the API, one change batch each. Every zone and record is in
//!   moto, no unit parks, the budget heard throttles and lowered its rate, and after the first
//!   10 s fewer than 5% of the changes were throttled (the issue's target).
//!
//! Both print the total time against N / R, the calls, and the throttled ones. R defaults to 5
//! (`SETPOINT_BUDGET_PEERS_R`); N to 60 e-mails and 100 zones (`SETPOINT_BUDGET_PEERS_N`), so
//! that the Route 53 run lasts well beyond its first 10 s.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::awsproxy::AwsProxy;
use common::peers::{Bearer, free_port, header_values, python_json, spawn, wait_port};
use common::stack::TmpDir;
use common::{EngineProcess, api_addr_of, parked, serve, setpoint};
use serde_json::{Value, json};
use setpoint::api::convert::json_to_struct;
use setpoint::api::proto::resource_service_client::ResourceServiceClient;
use setpoint::api::proto::{CreateResourceRequest, Resource};
use setpoint::queue::{self, NewWork};
use sqlx::PgPool;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The engines' common settings: fast polls and backoffs, so that the test measures the
/// budgets rather than the worker's idle time.
fn config_head(db_url: &str) -> String {
    format!(
        r#"
database_url = "{db_url}"

[worker]
poll_interval = "200ms"
lease = "10s"
backoff_base = "200ms"
backoff_cap = "2s"
"#
    )
}

/// Two engines on `config`, each serving its API.
async fn two_engines(config: &Path) -> Vec<EngineProcess> {
    let engines: Vec<EngineProcess> = (1..=2)
        .map(|i| serve(config, &format!("engine-{i}")))
        .collect();
    for e in &engines {
        api_addr_of(e).await;
    }
    engines
}

/// The row of the one budget key matching `pattern`: (key, rate, max_rate, throttles, waits).
async fn budget_row(pool: &PgPool, pattern: &str) -> Option<(String, f64, f64, i64, i64)> {
    sqlx::query_as(
        "SELECT key, rate, max_rate, throttles, waits FROM request_budgets WHERE key LIKE $1",
    )
    .bind(pattern)
    .fetch_optional(pool)
    .await
    .expect("budget row")
}

/// Events of every unit by kind: (waiting, failed, succeeded).
async fn unit_events(pool: &PgPool) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE event = 'waiting'),
                count(*) FILTER (WHERE event = 'failed'),
                count(*) FILTER (WHERE event = 'succeeded')
         FROM work_events",
    )
    .fetch_one(pool)
    .await
    .expect("events")
}

/// Polls `done` every 250 ms until it holds, noting the lowest rate the budget `pattern` had
/// meanwhile (the rate recovers, so its value at the end may be back at the maximum).
async fn wait_watching_rate<F, Fut>(
    pool: &PgPool,
    pattern: &str,
    limit: Duration,
    what: &str,
    mut done: F,
) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let mut lowest = f64::INFINITY;
    loop {
        if let Some((_, rate, ..)) = budget_row(pool, pattern).await {
            lowest = lowest.min(rate);
        }
        if done().await {
            return lowest;
        }
        assert!(started.elapsed() < limit, "{what}: not done in {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

// ---------------------------------------------------------------------------------------
// SMTP

/// An aiosmtpd relay that stores messages in a Maildir and answers a rate reply to `MAIL
/// FROM` once `limit` transactions started in the last second; it logs every `MAIL FROM` as
/// a JSON line: `{"t": unix time, "event": "mail" | "rate"}`.
const RATE_LIMITED_RELAY: &str = r#"
import asyncio, collections, json, sys, time
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import SMTP

port, maildir, log_path, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

class RateLimited(Mailbox):
    def __init__(self):
        super().__init__(maildir)
        self.window = collections.deque()
        self.log = open(log_path, "a", buffering=1)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # One event loop runs every session: no lock needed around the window.
        now = time.monotonic()
        while self.window and now - self.window[0] >= 1.0:
            self.window.popleft()
        if len(self.window) >= limit:
            self.log.write(json.dumps({"t": time.time(), "event": "rate"}) + "\n")
            return "451 4.7.0 rate limit exceeded, try again later"
        self.window.append(now)
        self.log.write(json.dumps({"t": time.time(), "event": "mail"}) + "\n")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

async def main():
    handler = RateLimited()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler), "127.0.0.1", port)
    await server.serve_forever()

asyncio.run(main())
"#;

/// The relay's log: (seconds since its first event, rate reply?) per `MAIL FROM`.
fn relay_log(path: &Path) -> Vec<(f64, bool)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let events: Vec<(f64, bool)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["t"].as_f64()?, v["event"] == "rate")))
        .collect();
    let first = events.first().map_or(0.0, |e| e.0);
    events.into_iter().map(|(t, r)| (t - first, r)).collect()
}

fn smtp_config(dir: &Path, db_url: &str, smtp_port: u16, r: usize) -> PathBuf {
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            r#"{head}
[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "setpoint <noreply@setpoint.test>"

# Twice what the relay takes: only the relay's rate replies keep the engines under it.
[smtp.budgets]
send = {{ rate = {rate}, burst = {r} }}

# The engine runs e-mail as part of the KVX kind, which needs [ec2] and [kubernetes] beside
# [smtp]. No unit here calls them (the orphan sweep's EC2 calls fail, and only log).
[ec2]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:9"

[kubernetes]
access = {{ mode = "url", url = "http://127.0.0.1:9" }}
"#,
            head = config_head(db_url),
            rate = 2 * r,
        ),
    )
    .expect("config");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_stay_under_a_rate_limiting_smtp_relay() {
    let n = env_number("SETPOINT_BUDGET_PEERS_N", 60);
    let r = env_number("SETPOINT_BUDGET_PEERS_R", 5);
    let dir = TmpDir::new("budgets-smtp");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let (ok, _, err) = setpoint(Some(&db.url), &["migrate"]);
    assert!(ok, "{err}");

    let script = dir.join("relay.py");
    std::fs::write(&script, RATE_LIMITED_RELAY).expect("relay script");
    let (port, maildir, log) = (free_port(), dir.join("mail"), dir.join("relay.jsonl"));
    let _relay = spawn(
        &format!(
            "exec python3 '{}' {port} '{}' '{}' {r}",
            script.display(),
            maildir.display(),
            log.display()
        ),
        &dir.join("relay.log"),
    );
    wait_port(port).await;
    let config = smtp_config(&dir, &db.url, port, r);
    let engines = two_engines(&config).await;

    let started = Instant::now();
    let mut tx = db.pool.begin().await.expect("tx");
    for i in 0..n {
        let spec = json!({
            "to": format!("owner-{i}@example.com"),
            "template": "instance-ready",
            "instance_id": uuid::Uuid::new_v4(),
            "instance_name": format!("vm-{i:03}"),
        });
        queue::enqueue(&mut tx, NewWork::new("email.send", spec))
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    queue::wake_workers(&db.pool).await.expect("wake");

    let key = "smtp/%/send";
    let lowest = wait_watching_rate(
        &db.pool,
        key,
        Duration::from_secs(60 + 2 * n as u64),
        "every e-mail sent",
        || {
            let pool = db.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM work")
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|left| left == 0)
            }
        },
    )
    .await;
    let total = started.elapsed();

    let ids: Vec<String> = header_values(&maildir, "Message-ID")
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    let events = relay_log(&log);
    let rate_replies = events.iter().filter(|e| e.1).count();
    let after: Vec<_> = events.iter().filter(|e| e.0 >= 3.0).collect();
    let rate_after = after.iter().filter(|e| e.1).count();
    let share = rate_after as f64 / after.len().max(1) as f64;
    let (waits, failed, succeeded) = unit_events(&db.pool).await;
    let parked = parked(&db.pool).await;
    let row = budget_row(&db.pool, key).await.expect("the relay's budget");
    println!(
        "N = {n} e-mails, relay at R = {r}/s, send budget {}/s, 2 engines: all sent in {:.1} s; \
         N / R = {:.1} s, ratio {:.2}",
        2 * r,
        total.as_secs_f64(),
        n as f64 / r as f64,
        total.as_secs_f64() / (n as f64 / r as f64)
    );
    println!(
        "MAIL FROM {} ({rate_replies} rate replies); after the first 3 s {} ({rate_after} rate \
         replies, {:.2}%); messages stored {}, distinct {}",
        events.len(),
        after.len(),
        share * 100.0,
        ids.len(),
        distinct.len()
    );
    println!(
        "unit events: {waits} waiting, {failed} failed, {succeeded} succeeded, {parked} parked"
    );
    println!(
        "budget (key, rate, max_rate, throttles, waits): {row:?}; lowest rate seen {lowest:.2}"
    );

    assert_eq!(ids.len(), n, "every e-mail stored once: {ids:?}");
    assert_eq!(distinct.len(), n, "no e-mail twice");
    assert_eq!(parked, 0, "no unit parks");
    assert_eq!(succeeded, n as i64, "every unit succeeded");
    assert!(
        row.3 > 0,
        "the relay's rate replies reached the budget: {row:?}"
    );
    assert!(
        lowest < row.2,
        "the rate went below its maximum: {lowest} vs {row:?}"
    );
    assert!(
        share < 0.10,
        "{:.2}% rate replies after the first 3 s",
        share * 100.0
    );
    drop(engines);
}

// ---------------------------------------------------------------------------------------
// Route 53

fn dns_config(dir: &Path, db_url: &str, route53: &str, r: usize) -> PathBuf {
    let config = dir.join("setpoint.toml");
    std::fs::write(
        &config,
        format!(
            r#"{head}
[plugins.dns]
endpoint_url = "{route53}"
# max_attempts stays at its default (3): with shared budgets the SDK resends no throttle.

# Twice what the proxy lets through: only its throttles keep the engines under it.
[plugins.dns.budgets]
change = {{ rate = {rate}, burst = {r} }}
"#,
            head = config_head(db_url),
            rate = 2 * r,
        ),
    )
    .expect("config");
    config
}

/// The zones moto holds: zone name → per hosted zone of that name, its `www` A records'
/// values.
fn moto_zones(endpoint: &str) -> BTreeMap<String, Vec<Vec<String>>> {
    let script = r#"
import boto3, json, sys
r53 = boto3.client('route53', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='testing', aws_secret_access_key='testing')
out = {}
for page in r53.get_paginator('list_hosted_zones').paginate():
    for z in page['HostedZones']:
        values = []
        for p in r53.get_paginator('list_resource_record_sets').paginate(HostedZoneId=z['Id']):
            for rr in p['ResourceRecordSets']:
                if rr['Type'] == 'A' and rr['Name'] == 'www.' + z['Name']:
                    values += [v['Value'] for v in rr.get('ResourceRecords', [])]
        out.setdefault(z['Name'], []).append(values)
print(json.dumps(out))
"#;
    serde_json::from_value(python_json(script, &[endpoint])).expect("zones")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_stay_under_a_throttling_route53() {
    // 100 zones: at R = 5 the changes alone take 20 s, so that the share after the first
    // 10 s is measured over half of them.
    let n = env_number("SETPOINT_BUDGET_PEERS_N", 100);
    let r = env_number("SETPOINT_BUDGET_PEERS_R", 5);
    let dir = TmpDir::new("budgets-route53");
    let db = setpoint::dev::testdb::test_db().await.expect("db");
    let (ok, _, err) = setpoint(Some(&db.url), &["migrate"]);
    assert!(ok, "{err}");

    let moto_port = free_port();
    let _moto = spawn(
        &format!("exec python3 -m moto.server -H 127.0.0.1 -p {moto_port}"),
        &dir.join("moto.log"),
    );
    wait_port(moto_port).await;
    let moto = format!("http://127.0.0.1:{moto_port}");
    let proxy = AwsProxy::route53_throttling(moto.clone(), r, &["ChangeResourceRecordSets"]).await;
    let config = dns_config(&dir, &db.url, &proxy.url(), r);
    let engines = two_engines(&config).await;
    let api_addr = api_addr_of(&engines[0]).await;

    let token = setpoint::api::auth::create_token(&db.pool, "demo", false, None)
        .await
        .expect("token");
    let channel = tonic::transport::Channel::from_shared(format!("http://{api_addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let rs = ResourceServiceClient::with_interceptor(
        channel,
        Bearer(format!("Bearer {}", token.token).parse().expect("header")),
    );

    let started = Instant::now();
    let domain = |i: usize| format!("z{i:03}.budgets.test");
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let all: Vec<_> = chunk
            .iter()
            .map(|&i| {
                let mut rs = rs.clone();
                let spec = json!({
                    "name": domain(i),
                    "records": [{"name": "www", "type": "A", "ttl": 300,
                                 "values": [format!("192.0.2.{}", i % 250 + 1)]}]
                });
                tokio::spawn(async move {
                    rs.create_resource(CreateResourceRequest {
                        parent: String::new(),
                        kind: "dns.zone".into(),
                        resource_id: format!("z-{i:03}"),
                        resource: Some(Resource {
                            spec: Some(json_to_struct(&spec)),
                            ..Resource::default()
                        }),
                        request_id: format!("create-z-{i:03}"),
                        bulk: false,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("create zone {i}: {e:?}"));
                })
            })
            .collect();
        for t in all {
            t.await.expect("create task");
        }
    }

    let key = "route53/%/change";
    let lowest = wait_watching_rate(
        &db.pool,
        key,
        Duration::from_secs(60 + 2 * n as u64),
        "every zone READY",
        || {
            let pool = db.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM instances
                     WHERE kind = 'dns.zone' AND status = 'READY' AND NOT EXISTS
                       (SELECT 1 FROM work WHERE work.resource_id = instances.id)",
                )
                .fetch_one(&pool)
                .await
                .is_ok_and(|ready| ready as usize >= n)
            }
        },
    )
    .await;
    let total = started.elapsed();

    let calls = proxy.snapshot();
    let changes: Vec<_> = calls
        .iter()
        .filter(|c| c.action == "ChangeResourceRecordSets")
        .collect();
    let first = changes.first().map_or(started, |c| c.at);
    let after: Vec<_> = changes
        .iter()
        .filter(|c| c.at.duration_since(first) >= Duration::from_secs(10))
        .collect();
    let throttled_all = changes.iter().filter(|c| c.throttled).count();
    let throttled_after = after.iter().filter(|c| c.throttled).count();
    let share = throttled_after as f64 / after.len().max(1) as f64;
    let mut by_action: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for c in &calls {
        let e = by_action.entry(c.action.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(c.throttled);
    }
    let (waits, failed, succeeded) = unit_events(&db.pool).await;
    let parked = parked(&db.pool).await;
    let row = budget_row(&db.pool, key).await.expect("the change budget");
    let zones = moto_zones(&moto);
    println!(
        "N = {n} zones, proxy at R = {r} changes/s, change budget {}/s, 2 engines: all READY in \
         {:.1} s; N / R = {:.1} s, ratio {:.2}",
        2 * r,
        total.as_secs_f64(),
        n as f64 / r as f64,
        total.as_secs_f64() / (n as f64 / r as f64)
    );
    println!(
        "ChangeResourceRecordSets {} ({throttled_all} throttled); after the first 10 s {} \
         ({throttled_after} throttled, {:.2}%)",
        changes.len(),
        after.len(),
        share * 100.0
    );
    println!("Route 53 calls by action (calls, throttled): {by_action:?}");
    println!(
        "unit events: {waits} waiting, {failed} failed, {succeeded} succeeded, {parked} parked"
    );
    println!(
        "budget (key, rate, max_rate, throttles, waits): {row:?}; lowest rate seen {lowest:.2}"
    );

    for i in 0..n {
        let name = format!("{}.", domain(i));
        let want = vec![vec![format!("192.0.2.{}", i % 250 + 1)]];
        assert_eq!(zones.get(&name), Some(&want), "zone {name} and its record");
    }
    assert_eq!(zones.len(), n, "no other zone: {zones:?}");
    assert_eq!(parked, 0, "no unit parks");
    assert!(row.3 > 0, "the throttles reached the budget: {row:?}");
    assert!(
        lowest < row.2,
        "the rate went below its maximum: {lowest} vs {row:?}"
    );
    // The issue's target. Measured 1.47-1.49% in four runs since the line of units and the
    // slow probing near the refused rate (4.0-9.2% before, when the units that had waited
    // came back in clumps), see docs/budgets.md.
    assert!(
        share < 0.05,
        "{:.2}% of the changes throttled after the first 10 s",
        share * 100.0
    );
    drop(engines);
}
