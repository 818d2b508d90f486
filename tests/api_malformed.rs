//! A sweep of malformed requests over every RPC of InstanceService and WorkService, sent as raw
//! HTTP/2 (no generated client would send them): wrong wire types, truncated messages and
//! frames, invalid UTF-8, nesting past the decoder's limit, control characters, overlong
//! strings, a flood of update-mask paths, broken framing. Every answer must be an error of
//! ours (never INTERNAL or UNKNOWN, never the decoder's or the database's words), small, and
//! nothing may be written. Then calls to made-up method paths must not add metric series.
//!
//! One test function: the metrics recorder is global to the test process, so nothing else may
//! call the API while the series are compared.

mod api_support;
mod common;

use std::collections::BTreeSet;

use api_support::raw::{Answer, Raw, frame};
use api_support::*;
use prost::Message;
use setpoint::api::proto::{
    CancelWorkRequest, CreateInstanceRequest, DeleteInstanceRequest, GetInstanceRequest,
    GetWorkRequest, Instance, ListInstancesRequest, ListWorkRequest, RetryWorkRequest,
    UpdateInstanceRequest, WatchInstanceRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

/// Largest error (message and details) a client may receive.
const MAX_ERROR_BYTES: usize = 4096;

/// Words that must never reach a client: the decoder's, tonic's framing errors, the database's.
const FORBIDDEN: &[&str] = &[
    "DecodeError",
    "failed to decode",
    "wire type",
    "buffer underflow",
    "invalid string value",
    "recursion limit",
    "unexpected end group",
    "protocol error",
    "Unexpected EOF",
    "Missing request message",
    "database",
    "PostgreSQL",
    "invalid byte sequence",
    "internal error",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Create,
    Get,
    List,
    Update,
    Delete,
    Watch,
    ListWork,
    GetWork,
    RetryWork,
    CancelWork,
}

const ALL: [Rpc; 10] = [
    Rpc::Create,
    Rpc::Get,
    Rpc::List,
    Rpc::Update,
    Rpc::Delete,
    Rpc::Watch,
    Rpc::ListWork,
    Rpc::GetWork,
    Rpc::RetryWork,
    Rpc::CancelWork,
];

const NAME: &str = "tenants/acme/instances/web-1";

impl Rpc {
    fn path(self) -> &'static str {
        match self {
            Rpc::Create => "/setpoint.v1.InstanceService/CreateInstance",
            Rpc::Get => "/setpoint.v1.InstanceService/GetInstance",
            Rpc::List => "/setpoint.v1.InstanceService/ListInstances",
            Rpc::Update => "/setpoint.v1.InstanceService/UpdateInstance",
            Rpc::Delete => "/setpoint.v1.InstanceService/DeleteInstance",
            Rpc::Watch => "/setpoint.v1.InstanceService/WatchInstance",
            Rpc::ListWork => "/setpoint.v1.WorkService/ListWork",
            Rpc::GetWork => "/setpoint.v1.WorkService/GetWork",
            Rpc::RetryWork => "/setpoint.v1.WorkService/RetryWork",
            Rpc::CancelWork => "/setpoint.v1.WorkService/CancelWork",
        }
    }

    fn mutates(self) -> bool {
        matches!(
            self,
            Rpc::Create | Rpc::Update | Rpc::Delete | Rpc::RetryWork | Rpc::CancelWork
        )
    }

    fn admin(self) -> bool {
        matches!(
            self,
            Rpc::ListWork | Rpc::GetWork | Rpc::RetryWork | Rpc::CancelWork
        )
    }

    /// A well-formed request (never sent as it is: the mutating ones would succeed).
    fn valid(self) -> Vec<u8> {
        self.with(None).remove(0).1
    }

    /// The request with each string field the server reads set to `value` in turn (the
    /// field's name as a violation names it, and the encoding); with `None`, the valid request.
    fn with(self, value: Option<&str>) -> Vec<(&'static str, Vec<u8>)> {
        let v = |field: &str| value.map(str::to_owned).unwrap_or(field.to_owned());
        let create = |f: &dyn Fn(&mut CreateInstanceRequest)| {
            let mut r = create_req("web-1", "r1");
            f(&mut r);
            r.encode_to_vec()
        };
        let update = |f: &dyn Fn(&mut UpdateInstanceRequest)| {
            let mut r = UpdateInstanceRequest {
                instance: Some(Instance {
                    name: NAME.into(),
                    spec: Some(spec()),
                    ..Instance::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["spec.plan".into()],
                }),
                request_id: "u1".into(),
                bulk: false,
            };
            f(&mut r);
            r.encode_to_vec()
        };
        let list_work = |f: &dyn Fn(&mut ListWorkRequest)| {
            let mut r = ListWorkRequest {
                state: "parked".into(),
                kind: "setpoint.noop".into(),
                resource_id: "5e1b4d33-2c41-4b8e-9a53-1b7a2e1f7c10".into(),
                page_size: 10,
                page_token: String::new(),
            };
            f(&mut r);
            r.encode_to_vec()
        };
        match (self, value) {
            (Rpc::Create, None) => vec![("", create(&|_| {}))],
            (Rpc::Create, Some(_)) => vec![
                ("parent", create(&|r| r.parent = v("tenants/acme"))),
                ("instance_id", create(&|r| r.instance_id = v("web-1"))),
                ("request_id", create(&|r| r.request_id = v("r1"))),
                ("instance.spec.plan", create(&|r| spec_of(r).plan = v(""))),
                (
                    "instance.spec.region",
                    create(&|r| spec_of(r).region = v("")),
                ),
                (
                    "instance.spec.owner_email",
                    create(&|r| spec_of(r).owner_email = v("")),
                ),
            ],
            (Rpc::Get, _) => vec![("name", GetInstanceRequest { name: v(NAME) }.encode_to_vec())],
            (Rpc::List, None) => vec![(
                "",
                ListInstancesRequest {
                    parent: "tenants/acme".into(),
                    page_size: 10,
                    ..Default::default()
                }
                .encode_to_vec(),
            )],
            (Rpc::List, Some(_)) => vec![
                (
                    "parent",
                    ListInstancesRequest {
                        parent: v(""),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
                (
                    "page_token",
                    ListInstancesRequest {
                        page_token: v(""),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
            ],
            (Rpc::Update, None) => vec![("", update(&|_| {}))],
            (Rpc::Update, Some(_)) => vec![
                (
                    "instance.name",
                    update(&|r| r.instance.as_mut().unwrap().name = v(NAME)),
                ),
                ("request_id", update(&|r| r.request_id = v("u1"))),
                ("instance.spec.plan", update(&|r| uspec(r).plan = v(""))),
                // Outside the mask: not used, but checked as text all the same.
                ("instance.spec.region", update(&|r| uspec(r).region = v(""))),
                (
                    "instance.spec.owner_email",
                    update(&|r| uspec(r).owner_email = v("")),
                ),
                (
                    "update_mask",
                    update(&|r| r.update_mask.as_mut().unwrap().paths = vec![v("")]),
                ),
            ],
            (Rpc::Delete, _) => vec![
                (
                    "name",
                    DeleteInstanceRequest {
                        name: v(NAME),
                        request_id: "d1".into(),
                        bulk: false,
                    }
                    .encode_to_vec(),
                ),
                (
                    "request_id",
                    DeleteInstanceRequest {
                        name: NAME.into(),
                        request_id: v("d1"),
                        bulk: false,
                    }
                    .encode_to_vec(),
                ),
            ],
            (Rpc::Watch, _) => vec![(
                "name",
                WatchInstanceRequest { name: v(NAME) }.encode_to_vec(),
            )],
            (Rpc::ListWork, None) => vec![("", list_work(&|_| {}))],
            (Rpc::ListWork, Some(_)) => vec![
                ("state", list_work(&|r| r.state = v(""))),
                ("kind", list_work(&|r| r.kind = v(""))),
                ("resource_id", list_work(&|r| r.resource_id = v(""))),
                ("page_token", list_work(&|r| r.page_token = v(""))),
            ],
            (Rpc::GetWork, None) => vec![("", GetWorkRequest { id: 1 }.encode_to_vec())],
            // No string fields.
            (Rpc::GetWork, Some(_)) => Vec::new(),
            (Rpc::RetryWork, None) => vec![(
                "",
                RetryWorkRequest {
                    id: 1,
                    extra_attempts: 3,
                    request_id: String::new(),
                }
                .encode_to_vec(),
            )],
            (Rpc::RetryWork, Some(_)) => vec![(
                "request_id",
                RetryWorkRequest {
                    id: 1,
                    extra_attempts: 3,
                    request_id: v("r1"),
                }
                .encode_to_vec(),
            )],
            (Rpc::CancelWork, _) => vec![
                (
                    "reason",
                    CancelWorkRequest {
                        id: 1,
                        reason: v("why"),
                        request_id: String::new(),
                    }
                    .encode_to_vec(),
                ),
                (
                    "request_id",
                    CancelWorkRequest {
                        id: 1,
                        reason: String::new(),
                        request_id: v("c1"),
                    }
                    .encode_to_vec(),
                ),
            ],
        }
    }
}

fn spec_of(r: &mut CreateInstanceRequest) -> &mut setpoint::api::proto::InstanceSpec {
    r.instance.as_mut().unwrap().spec.as_mut().unwrap()
}

fn uspec(r: &mut UpdateInstanceRequest) -> &mut setpoint::api::proto::InstanceSpec {
    r.instance.as_mut().unwrap().spec.as_mut().unwrap()
}

/// A protobuf varint.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Field `field` with wire type `wire` and a payload that type would carry (types 6 and 7 do
/// not exist).
fn wire_junk(field: u64, wire: u64) -> Vec<u8> {
    let mut v = Vec::new();
    varint(field << 3 | wire, &mut v);
    match wire {
        0 => v.extend([0x96, 0x01]),
        1 => v.extend([1u8; 8]),
        2 => v.extend([3, b'a', b'b', b'c']),
        3 => v.extend([0x08, 0x01]), // a group that never ends
        4 => {}                      // an end of a group never started
        5 => v.extend([1u8; 4]),
        _ => v.extend([0x01]),
    }
    v
}

/// An unknown group (field 15) nested `depth` deep.
fn nested_groups(depth: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..depth {
        varint(15 << 3 | 3, &mut v);
    }
    for _ in 0..depth {
        varint(15 << 3 | 4, &mut v);
    }
    v
}

/// A create or update request whose (output-only) `observed` Struct nests `depth` deep and
/// whose request id is missing (so that it could never be accepted).
fn nested_struct(rpc: Rpc, depth: usize) -> Vec<u8> {
    use prost_types::value::Kind;
    let mut s = prost_types::Struct::default();
    for _ in 0..depth {
        let inner = prost_types::Value {
            kind: Some(Kind::StructValue(s)),
        };
        s = prost_types::Struct {
            fields: [("a".to_owned(), inner)].into_iter().collect(),
        };
    }
    let instance = Instance {
        name: NAME.into(),
        spec: Some(spec()),
        observed: Some(s),
        ..Instance::default()
    };
    match rpc {
        Rpc::Create => CreateInstanceRequest {
            instance_id: "web-1".into(),
            instance: Some(instance),
            ..Default::default()
        }
        .encode_to_vec(),
        _ => UpdateInstanceRequest {
            instance: Some(instance),
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

/// One case: what to send and what must come back.
struct Case {
    rpc: Rpc,
    what: String,
    body: Vec<u8>,
    /// The code it must get, when one is certain.
    want: Option<Code>,
    /// The field its BadRequest must name, when one is certain.
    field: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for rpc in ALL {
        let valid = rpc.valid();
        let mut add = |what: String, body: Vec<u8>, want: Option<Code>, field| {
            out.push(Case {
                rpc,
                what,
                body,
                want,
                field,
            });
        };
        // Wrong wire types (some happen to decode: then the request is judged on its fields).
        for field in 1..=4u64 {
            for wire in 0..=7u64 {
                add(
                    format!("field {field} wire type {wire}"),
                    frame(&wire_junk(field, wire)),
                    None,
                    None,
                );
            }
        }
        // The valid request cut short, inside the protobuf (the frame says the cut length).
        for cut in (1..valid.len()).step_by(3) {
            add(format!("cut at {cut}"), frame(&valid[..cut]), None, None);
        }
        // Nesting past the decoder's limit.
        add(
            "unknown groups 150 deep".into(),
            frame(&nested_groups(150)),
            Some(Code::InvalidArgument),
            None,
        );
        if matches!(rpc, Rpc::Create | Rpc::Update) {
            add(
                "observed 120 deep".into(),
                frame(&nested_struct(rpc, 120)),
                Some(Code::InvalidArgument),
                None,
            );
            add(
                "observed 20 deep, no request id".into(),
                frame(&nested_struct(rpc, 20)),
                Some(Code::InvalidArgument),
                Some("request_id"),
            );
        }
        // Framing.
        let mut header_only = frame(&valid);
        header_only.truncate(5);
        let mut longer = vec![0u8];
        longer.extend_from_slice(&((valid.len() + 10) as u32).to_be_bytes());
        longer.extend_from_slice(&valid);
        let mut two = frame(&valid);
        two.extend(frame(&valid));
        let mut trailing = frame(&valid);
        trailing.extend([1, 2, 3]);
        let mut compressed = frame(&valid);
        compressed[0] = 1;
        let mut bad_flag = frame(&valid);
        bad_flag[0] = 9;
        let mut huge_len = frame(&valid);
        huge_len[1..5].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
        for (what, body) in [
            ("no frame", Vec::new()),
            ("three bytes", vec![0, 0, 0]),
            ("a frame header only", header_only),
            ("a frame shorter than it says", longer),
            ("two frames", two),
            ("bytes after the frame", trailing),
            ("the compressed flag", compressed),
            ("flag 9", bad_flag),
        ] {
            add(what.into(), body, Some(Code::InvalidArgument), None);
        }
        add(
            "a length of 2 GiB".into(),
            huge_len,
            Some(Code::OutOfRange),
            None,
        );
        add(
            "70,000 bytes".into(),
            frame(&vec![0u8; 70_000]),
            Some(Code::OutOfRange),
            None,
        );
        // Every string field the server reads: invalid UTF-8, NUL, control characters, too long.
        for (label, value) in [
            ("invalid UTF-8", "@@@@"),
            ("NUL", "a\0b"),
            ("a line break", "a\nb"),
            ("an escape", "\u{1b}[2J"),
            ("20,000 characters", &"é".repeat(20_000)),
        ] {
            for (field, mut body) in rpc.with(Some(value)) {
                let malformed = label == "invalid UTF-8";
                if malformed {
                    let at = body
                        .windows(4)
                        .position(|w| w == b"@@@@")
                        .expect("placeholder");
                    body[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0x80, 0xc0]);
                }
                add(
                    format!("{label} in {field}"),
                    frame(&body),
                    Some(Code::InvalidArgument),
                    (!malformed).then_some(field),
                );
            }
        }
    }
    // 32,000 empty update-mask paths in 64 KB.
    let flood = UpdateInstanceRequest {
        instance: Some(Instance {
            name: NAME.into(),
            spec: Some(spec()),
            ..Instance::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![String::new(); 31_000],
        }),
        request_id: "u1".into(),
        bulk: false,
    }
    .encode_to_vec();
    assert!(flood.len() < 64 * 1024, "{}", flood.len());
    out.push(Case {
        rpc: Rpc::Update,
        what: "31,000 empty update-mask paths".into(),
        body: frame(&flood),
        want: Some(Code::InvalidArgument),
        field: Some("update_mask"),
    });
    out
}

fn judge(case: &Case, a: &Answer) {
    let what = format!(
        "{:?} with {}: {:?} {:?}",
        case.rpc, case.what, a.code, a.message
    );
    assert!(
        !matches!(a.code, Code::Internal | Code::Unknown | Code::DataLoss),
        "{what}"
    );
    if case.rpc.mutates() {
        assert_ne!(a.code, Code::Ok, "{what}");
    }
    if let Some(want) = case.want {
        assert_eq!(a.code, want, "{what}");
    }
    assert!(
        a.error_size() <= MAX_ERROR_BYTES,
        "{what}: {} bytes",
        a.error_size()
    );
    for word in FORBIDDEN {
        assert!(
            !a.message.to_lowercase().contains(&word.to_lowercase()),
            "{what}: says {word:?}"
        );
    }
    if let Some(field) = case.field {
        let named: Vec<String> = a
            .status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        assert!(named.iter().any(|f| f == field), "{what}: names {named:?}");
    }
}

/// The series of a Prometheus text body: every sample line without its value.
fn series(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

async fn table_counts(env: &Env) -> [i64; 3] {
    [
        count(&env.db, "SELECT count(*) FROM instances").await,
        count(&env.db, "SELECT count(*) FROM work").await,
        count(&env.db, "SELECT count(*) FROM api_requests").await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_small_errors_of_ours_and_write_nothing() {
    let metrics = setpoint::metrics::install().expect("recorder");
    let env = Env::default().await;
    let before = table_counts(&env).await;
    let mut raw = Raw::connect(env.addr).await;

    let cases = cases();
    assert!(cases.len() >= 300, "{} cases", cases.len());
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for case in &cases {
        let token = if case.rpc.admin() {
            &env.admin
        } else {
            &env.acme
        };
        let answer = raw
            .call(case.rpc.path(), Some(token), case.body.clone())
            .await;
        judge(case, &answer);
        *codes.entry(format!("{:?}", answer.code)).or_default() += 1;
    }
    eprintln!("{} malformed requests: {codes:?}", cases.len());
    assert_eq!(table_counts(&env).await, before, "nothing was written");

    // Made-up method paths add no metric series: one of each kind first (their series may be
    // new), then many more, which must not change the set of series.
    let paths = |n: usize| format!("/x.{}.Svc/M{n}", uuid::Uuid::new_v4().simple());
    let random_token = || format!("spt_{}", uuid::Uuid::new_v4().simple());
    let mut round = async |n: usize| {
        for i in 0..n {
            raw.call(&paths(i), None, frame(b"")).await;
            raw.call(&paths(i), Some(&random_token()), frame(b"")).await;
            let known = raw.call(&paths(i), Some(&env.acme), frame(b"")).await;
            assert_eq!(known.code, Code::Unimplemented);
        }
    };
    round(1).await;
    let first = metrics.render();
    round(150).await;
    let second = metrics.render();
    assert_eq!(series(&first), series(&second));
    assert!(
        second.len() <= first.len() + 16,
        "the body grew from {} to {} bytes",
        first.len(),
        second.len()
    );
    assert!(!second.contains("/x."), "a made-up path became a label");
    assert!(second.contains("method=\"unknown\""), "{second}");
    env.stop().await;
}
