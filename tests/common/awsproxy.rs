//! An HTTP proxy in front of moto that records every AWS call (its action, region and, for
//! EC2, its filters) and, when given a limit, answers the service's throttling error to a call
//! once `limit` calls of the same action in the same region passed in the last second (AWS
//! limits an account's requests per region).
//!
//! Two protocols ([`Protocol`]): EC2's query API, where the action is the body's `Action` and
//! the throttle is `RequestLimitExceeded` (HTTP 503); and Route 53's REST API, where the
//! action is the operation the method and path pattern name (`POST
//! /2013-04-01/hostedzone/{Id}/rrset/` is `ChangeResourceRecordSets`) and the throttle is
//! `Throttling` (HTTP 400, Route 53's `ErrorResponse`, as Route 53 answers above its five
//! change requests per second).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

/// One call the proxy saw.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it arrived.
    pub at: Instant,
    /// Its action: EC2's `Action` (`DescribeInstances`, …; `unknown` when the body names
    /// none), or the Route 53 operation of its method and path ([`route53_action`]).
    pub action: String,
    /// The region of its signature's credential scope (`unknown` without one).
    pub region: String,
    /// Its filters: (name, values), in the order sent.
    pub filters: Vec<(String, Vec<String>)>,
    /// Whether it asks for a page after the first (it carries a `NextToken`).
    pub next_page: bool,
    /// Whether the proxy answered the throttling error instead of forwarding it.
    pub throttled: bool,
}

impl Call {
    /// The values of its filter `name` (empty when it has none).
    pub fn filter(&self, name: &str) -> &[String] {
        self.filters
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&[], |(_, v)| v.as_slice())
    }
}

/// What the proxy saw, in arrival order.
pub type Calls = Arc<Mutex<Vec<Call>>>;

/// The API the proxy stands in front of: how it names a call's action and how it throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// EC2's query API: the body's `Action`; `RequestLimitExceeded`, HTTP 503.
    Ec2,
    /// Route 53's REST API: the operation of method and path; `Throttling`, HTTP 400.
    Route53,
}

/// The proxy; it stops when dropped.
pub struct AwsProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every call so far.
    pub calls: Calls,
    stop: CancellationToken,
}

impl AwsProxy {
    /// A proxy to EC2 at `upstream` (`http://host:port`) that only counts.
    pub async fn counting(upstream: String) -> Self {
        Self::start(upstream, Protocol::Ec2, None, None).await
    }

    /// A proxy to EC2 at `upstream` that throttles each `Action` above `limit` calls per
    /// second in each region.
    pub async fn throttling(upstream: String, limit: usize) -> Self {
        Self::start(upstream, Protocol::Ec2, Some(limit), None).await
    }

    /// A proxy to Route 53 at `upstream` that throttles the actions named in `only` above
    /// `limit` calls per second each (Route 53 limits `ChangeResourceRecordSets` to five per
    /// second per account, and its other operations separately) and forwards the rest.
    pub async fn route53_throttling(upstream: String, limit: usize, only: &[&str]) -> Self {
        let only = only.iter().map(|a| (*a).to_owned()).collect();
        Self::start(upstream, Protocol::Route53, Some(limit), Some(only)).await
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the calls seen so far.
    pub fn snapshot(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    async fn start(
        upstream: String,
        protocol: Protocol,
        limit: Option<usize>,
        only: Option<Vec<String>>,
    ) -> Self {
        let policy = Arc::new(Policy {
            protocol,
            limit,
            only,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls: Calls = Arc::default();
        let forwarder = Forwarder {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http::<Full<Bytes>>(),
            upstream: Arc::new(upstream),
            policy,
            windows: Arc::default(),
            seen: calls.clone(),
        };
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let forwarder = forwarder.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let forwarder = forwarder.clone();
                        async move { Ok::<_, Infallible>(forwarder.forward(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, calls, stop }
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What the proxy throttles, and how it answers.
struct Policy {
    protocol: Protocol,
    /// Calls of one action per second; `None`: only count.
    limit: Option<usize>,
    /// The actions throttled; `None`: every action.
    only: Option<Vec<String>>,
}

/// What each connection of the proxy shares: where it forwards, what it throttles, and what it
/// has seen.
#[derive(Clone)]
struct Forwarder {
    client: Client,
    upstream: Arc<String>,
    policy: Arc<Policy>,
    /// Per `region/action`, the calls of the last second.
    windows: Arc<Mutex<HashMap<String, VecDeque<Instant>>>>,
    seen: Calls,
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// The region of a SigV4 `Authorization` header (`Credential=KEY/DATE/REGION/SERVICE/…`).
fn region_of(headers: &hyper::HeaderMap) -> String {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or("unknown")
        .to_owned()
}

/// The `Filter.N.Name` / `Filter.N.Value.M` pairs of a query body, by filter number.
fn filters_of(params: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    let mut by_number: std::collections::BTreeMap<u32, (String, Vec<(u32, String)>)> =
        Default::default();
    for (k, v) in params {
        let mut parts = k.split('.');
        if parts.next() != Some("Filter") {
            continue;
        }
        let Some(n) = parts.next().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let entry = by_number.entry(n).or_default();
        match (
            parts.next(),
            parts.next().and_then(|m| m.parse::<u32>().ok()),
        ) {
            (Some("Name"), None) => entry.0 = v.clone(),
            (Some("Value"), Some(m)) => entry.1.push((m, v.clone())),
            _ => {}
        }
    }
    by_number
        .into_values()
        .map(|(name, mut values)| {
            values.sort_by_key(|(m, _)| *m);
            (name, values.into_iter().map(|(_, v)| v).collect())
        })
        .collect()
}

/// The Route 53 operation of a REST call (API version 2013-04-01): its method and path
/// pattern, the ids taken out; `METHOD /pattern` for one not listed here.
pub fn route53_action(method: &hyper::Method, path: &str) -> String {
    let parts: Vec<&str> = path
        .trim_start_matches("/2013-04-01")
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let m = method.as_str();
    let named = match (m, parts.as_slice()) {
        ("POST", ["hostedzone"]) => "CreateHostedZone",
        ("GET", ["hostedzone"]) => "ListHostedZones",
        ("GET", ["hostedzonesbyname"]) => "ListHostedZonesByName",
        ("GET", ["hostedzone", _]) => "GetHostedZone",
        ("POST", ["hostedzone", _]) => "UpdateHostedZoneComment",
        ("DELETE", ["hostedzone", _]) => "DeleteHostedZone",
        ("POST", ["hostedzone", _, "rrset"]) => "ChangeResourceRecordSets",
        ("GET", ["hostedzone", _, "rrset"]) => "ListResourceRecordSets",
        ("GET", ["change", _]) => "GetChange",
        ("POST", ["tags", "hostedzone", _]) => "ChangeTagsForResource",
        ("GET", ["tags", "hostedzone", _]) => "ListTagsForResource",
        _ => "",
    };
    if named.is_empty() {
        format!("{m} /{}", parts.join("/"))
    } else {
        named.to_owned()
    }
}

/// The throttling answer of `protocol`, as the service sends it.
fn throttle_answer(protocol: Protocol) -> hyper::Response<Full<Bytes>> {
    let (status, xml) = match protocol {
        Protocol::Ec2 => (
            503,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
             <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>\
             </Error></Errors><RequestID>throttling-proxy</RequestID></Response>",
        ),
        // Route 53 throttles with HTTP 400 and its REST `ErrorResponse`; the SDK reads the
        // code, and `Throttling` is among its (and the adapter's) throttling codes.
        Protocol::Route53 => (
            400,
            "<?xml version=\"1.0\"?>\n<ErrorResponse \
             xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><Error><Type>Sender</Type>\
             <Code>Throttling</Code><Message>Rate exceeded</Message></Error>\
             <RequestId>throttling-proxy</RequestId></ErrorResponse>",
        ),
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(xml)))
        .unwrap_or_default()
}

impl Forwarder {
    /// Records the call, answers a throttle when its action is over the limit in its region,
    /// else forwards it upstream and returns the answer.
    async fn forward(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let params: Vec<(String, String)> = form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let action = match self.policy.protocol {
            Protocol::Ec2 => params
                .iter()
                .find(|(k, _)| k == "Action")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "unknown".into()),
            Protocol::Route53 => route53_action(&parts.method, parts.uri.path()),
        };
        let now = Instant::now();
        let region = region_of(&parts.headers);
        let limited = self
            .policy
            .only
            .as_ref()
            .is_none_or(|only| only.contains(&action));
        let throttle = limited
            && self.policy.limit.is_some_and(|limit| {
                let mut windows = self.windows.lock().expect("windows");
                let window = windows.entry(format!("{region}/{action}")).or_default();
                while window
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    window.pop_front();
                }
                let throttle = window.len() >= limit;
                if !throttle {
                    window.push_back(now);
                }
                throttle
            });
        self.seen.lock().expect("seen").push(Call {
            at: now,
            action,
            region,
            filters: filters_of(&params),
            next_page: params.iter().any(|(k, _)| k == "NextToken"),
            throttled: throttle,
        });
        if throttle {
            return throttle_answer(self.policy.protocol);
        }
        let uri = format!(
            "{}{}",
            self.upstream,
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut forward = hyper::Request::builder().method(parts.method).uri(uri);
        for (k, v) in &parts.headers {
            forward = forward.header(k, v);
        }
        let Ok(forward) = forward.body(Full::new(body)) else {
            return bad_gateway();
        };
        match self.client.request(forward).await {
            Ok(answer) => {
                let (parts, body) = answer.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                hyper::Response::from_parts(parts, Full::new(body))
            }
            Err(_) => bad_gateway(),
        }
    }
}

fn bad_gateway() -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"bad gateway")));
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}
