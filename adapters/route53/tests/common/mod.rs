//! Test fixtures: a moto server per test binary, a fake Route 53 endpoint, client helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_route53::Client;
use aws_sdk_route53::config::Credentials;
use aws_sdk_route53::types::{
    Change, ChangeAction, ChangeBatch, ResourceRecord, ResourceRecordSet, RrType, TagResourceType,
};
use setpoint_adapter::{Fence, IdempotencyToken};
use setpoint_route53::{
    RecordSpec, RecordType, Route53Config, Route53Dns, ZoneInfo, ZoneRef, ZoneRequest, ZoneSpec,
};

/// A moto server process, killed on drop. The Python side also exits when the test binary
/// does (it watches its parent), so a `static` fixture never outlives the tests.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto on a free port, waiting until it listens.
    pub fn start() -> Moto {
        let port = free_port();
        let script = format!(
            "import os, sys, threading, time\n\
             parent = os.getppid()\n\
             def watch():\n\
             \x20   while os.getppid() == parent:\n\
             \x20       time.sleep(0.5)\n\
             \x20   os._exit(0)\n\
             threading.Thread(target=watch, daemon=True).start()\n\
             from moto.server import main\n\
             main(['-H', '127.0.0.1', '-p', '{port}'])\n"
        );
        let child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] must be installed");
        let moto = Moto { child, port };
        let give_up = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < give_up,
                "moto did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One moto for the test binary; tests use zones of their own names, so they share it.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(Moto::start)
}

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration for tests: one SDK attempt, short timeouts, tiny pages (so every listing
/// in the tests pages).
pub fn config(endpoint: &str) -> Route53Config {
    let mut c = Route53Config {
        endpoint_url: Some(endpoint.to_owned()),
        max_attempts: 1,
        zones_page_size: 2,
        records_page_size: 3,
        ..Route53Config::default()
    };
    c.timeouts.connect_ms = 2_000;
    c.timeouts.attempt_ms = 15_000;
    c.timeouts.operation_ms = 20_000;
    c
}

pub async fn dns(config: Route53Config) -> Route53Dns {
    let client = config
        .client_with_credentials(Credentials::new("testing", "testing", None, None, "tests"))
        .await
        .unwrap();
    Route53Dns::from_client(client, config)
}

/// True when the tests run against AWS instead of moto (`SETPOINT_ROUTE53_TEST_AWS=1`).
pub fn on_aws() -> bool {
    std::env::var("SETPOINT_ROUTE53_TEST_AWS").is_ok_and(|v| v == "1")
}

/// The adapter on the tests' peer: the shared moto, or AWS with the standard credential chain
/// when [`on_aws`].
pub async fn peer_dns() -> Route53Dns {
    if on_aws() {
        let c = Route53Config {
            zones_page_size: 2,
            records_page_size: 3,
            ..Route53Config::default()
        };
        return Route53Dns::connect(c).await.unwrap();
    }
    dns(config(&moto().url())).await
}

/// A zone name no other test uses, under `SETPOINT_ROUTE53_TEST_DOMAIN` (default
/// `example.com`).
pub fn unique_zone() -> String {
    let parent =
        std::env::var("SETPOINT_ROUTE53_TEST_DOMAIN").unwrap_or_else(|_| "example.com".to_owned());
    format!(
        "t{}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12],
        parent.trim_end_matches('.')
    )
}

/// Removes a test zone whatever it holds (records other than the apex SOA/NS, then the zone),
/// so that runs against AWS leave nothing behind.
pub async fn purge(client: &Client, zone_id: &str) {
    let Ok(zone) = client.get_hosted_zone().id(zone_id).send().await else {
        return;
    };
    let apex = zone
        .hosted_zone()
        .map(|z| z.name().to_owned())
        .unwrap_or_default();
    let out = client
        .list_resource_record_sets()
        .hosted_zone_id(zone_id)
        .send()
        .await
        .unwrap();
    let changes: Vec<Change> = out
        .resource_record_sets()
        .iter()
        .filter(|r| !(r.name() == apex && matches!(r.r#type(), RrType::Soa | RrType::Ns)))
        .map(|r| {
            Change::builder()
                .action(ChangeAction::Delete)
                .resource_record_set(r.clone())
                .build()
                .unwrap()
        })
        .collect();
    if !changes.is_empty() {
        client
            .change_resource_record_sets()
            .hosted_zone_id(zone_id)
            .change_batch(
                ChangeBatch::builder()
                    .set_changes(Some(changes))
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
    }
    client
        .delete_hosted_zone()
        .id(zone_id)
        .send()
        .await
        .unwrap();
}

pub fn record(name: &str, t: RecordType, ttl: u32, values: &[&str]) -> RecordSpec {
    RecordSpec {
        name: name.to_owned(),
        record_type: t,
        ttl,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
        set_identifier: None,
        weight: None,
    }
}

pub fn weighted(name: &str, t: RecordType, set: &str, weight: u8, values: &[&str]) -> RecordSpec {
    RecordSpec {
        set_identifier: Some(set.to_owned()),
        weight: Some(weight),
        ..record(name, t, 60, values)
    }
}

pub fn request(zone: &str, records: Vec<RecordSpec>) -> ZoneRequest {
    ZoneRequest {
        resource_id: uuid::Uuid::new_v4(),
        tenant: "acme".to_owned(),
        spec: ZoneSpec {
            name: zone.to_owned(),
            comment: Some("made by setpoint tests".to_owned()),
            records,
        },
    }
}

/// A zone made for a request, with its records written, as the create chain leaves it.
pub struct Made {
    /// The token of the unit that created the zone.
    pub token: IdempotencyToken,
    pub info: ZoneInfo,
    pub zref: ZoneRef,
}

/// Runs `ensure_zone` and `sync_records` for `req` (fresh token, unbounded fence).
pub async fn made_zone(dns: &Route53Dns, req: &ZoneRequest) -> Made {
    let token = IdempotencyToken::generate();
    let fence = Fence::unbounded();
    let info = dns.ensure_zone(&token, req, &fence).await.unwrap();
    let zref = ZoneRef::id(&info.id);
    dns.sync_records(&token.derive("records"), &zref, req, &fence)
        .await
        .unwrap();
    Made { token, info, zref }
}

/// Zones (bare ids) with this name, read directly from Route 53 (all pages).
pub async fn zones_named(client: &Client, name: &str) -> Vec<String> {
    let wanted = format!("{}.", name.trim_end_matches('.'));
    let mut out = Vec::new();
    let mut marker = None;
    loop {
        let page = client
            .list_hosted_zones()
            .set_marker(marker.take())
            .send()
            .await
            .unwrap();
        out.extend(
            page.hosted_zones()
                .iter()
                .filter(|z| z.name() == wanted)
                .map(|z| z.id().trim_start_matches("/hostedzone/").to_owned()),
        );
        match page.next_marker() {
            Some(m) if page.is_truncated() => marker = Some(m.to_owned()),
            _ => return out,
        }
    }
}

/// Every record set of a zone as `(TYPE, name, values)`, sorted, read directly.
pub async fn record_sets(client: &Client, zone_id: &str) -> Vec<(String, String, Vec<String>)> {
    let out = client
        .list_resource_record_sets()
        .hosted_zone_id(zone_id)
        .send()
        .await
        .unwrap();
    assert!(!out.is_truncated(), "the tests' zones fit in one page");
    let mut sets: Vec<_> = out
        .resource_record_sets()
        .iter()
        .map(|r| {
            (
                r.r#type().as_str().to_owned(),
                r.name().to_owned(),
                r.resource_records()
                    .iter()
                    .map(|v| v.value().to_owned())
                    .collect(),
            )
        })
        .collect();
    sets.sort();
    sets
}

/// The values of one record set (`None` if absent), read directly.
pub async fn values_of(client: &Client, zone_id: &str, t: &str, name: &str) -> Option<Vec<String>> {
    record_sets(client, zone_id)
        .await
        .into_iter()
        .find(|(rt, n, _)| rt == t && n == name)
        .map(|(_, _, v)| v)
}

/// The zone's tags, read directly.
pub async fn tags(client: &Client, zone_id: &str) -> Vec<(String, String)> {
    let out = client
        .list_tags_for_resource()
        .resource_type(TagResourceType::Hostedzone)
        .resource_id(zone_id)
        .send()
        .await
        .unwrap();
    let mut tags: Vec<_> = out
        .resource_tag_set()
        .map(|s| s.tags().to_vec())
        .unwrap_or_default()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    tags.sort();
    tags
}

/// Writes a record set directly, as someone outside setpoint would.
pub async fn write_directly(
    client: &Client,
    zone_id: &str,
    action: ChangeAction,
    name: &str,
    t: RrType,
    ttl: i64,
    values: &[&str],
) {
    let mut set = ResourceRecordSet::builder().name(name).r#type(t).ttl(ttl);
    for v in values {
        set = set.resource_records(ResourceRecord::builder().value(*v).build().unwrap());
    }
    client
        .change_resource_record_sets()
        .hosted_zone_id(zone_id)
        .change_batch(
            ChangeBatch::builder()
                .changes(
                    Change::builder()
                        .action(action)
                        .resource_record_set(set.build().unwrap())
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

/// A fake Route 53 endpoint: answers every request with `status` and `body`. Runs until the
/// process exits.
pub fn fake_endpoint(status: u16, body: &'static str) -> String {
    fake_route53(move |_| (status, body))
}

/// A fake Route 53 endpoint that answers each request with what `route` gives for its request
/// line (`POST /2013-04-01/hostedzone HTTP/1.1`). Runs until the process exits.
pub fn fake_route53(route: impl Fn(&str) -> (u16, &'static str) + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let route = std::sync::Arc::new(route);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let route = route.clone();
            thread::spawn(move || {
                let line = read_request(&mut stream).unwrap_or_default();
                let (status, body) = route(&line);
                let response = format!(
                    "HTTP/1.1 {status} Answer\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
                let _ = stream.flush();
            });
        }
    });
    url
}

/// An empty `ListHostedZones` answer.
pub const NO_ZONES: &str = "<?xml version=\"1.0\"?>\n<ListHostedZonesResponse \
     xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><HostedZones/><Marker></Marker>\
     <IsTruncated>false</IsTruncated><MaxItems>2</MaxItems></ListHostedZonesResponse>";

/// Route 53's XML error body for `code`.
pub fn error_body(code: &str, message: &str) -> &'static str {
    Box::leak(
        format!(
            "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"https://route53.amazonaws.com/doc/\
             2013-04-01/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}\
             </Message></Error><RequestId>r-1</RequestId></ErrorResponse>"
        )
        .into_boxed_str(),
    )
}

/// Reads one request; returns its request line.
fn read_request(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(String::new());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let line = head.lines().next().unwrap_or_default().to_owned();
            let head = head.to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Ok(line);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(line);
        }
    }
}
