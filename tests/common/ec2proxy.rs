//! An HTTP proxy in front of moto that records every EC2 call (its `Action`, region and
//! filters) and, when given a limit, answers EC2's `RequestLimitExceeded` (HTTP 503) to a call
//! once `limit` calls of the same `Action` in the same region passed in the last second (EC2
//! limits requests per account and region).

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
    /// Its `Action` (`DescribeInstances`, …; `unknown` when the body names none).
    pub action: String,
    /// The region of its signature's credential scope (`unknown` without one).
    pub region: String,
    /// Its filters: (name, values), in the order sent.
    pub filters: Vec<(String, Vec<String>)>,
    /// Whether it asks for a page after the first (it carries a `NextToken`).
    pub next_page: bool,
    /// Whether the proxy answered `RequestLimitExceeded` instead of forwarding it.
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

/// The proxy; it stops when dropped.
pub struct Ec2Proxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Every call so far.
    pub calls: Calls,
    stop: CancellationToken,
}

impl Ec2Proxy {
    /// A proxy to `upstream` (`http://host:port`) that only counts.
    pub async fn counting(upstream: String) -> Self {
        Self::start(upstream, None).await
    }

    /// A proxy to `upstream` that throttles each `Action` above `limit` calls per second in
    /// each region.
    pub async fn throttling(upstream: String, limit: usize) -> Self {
        Self::start(upstream, Some(limit)).await
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of the calls seen so far.
    pub fn snapshot(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    async fn start(upstream: String, limit: Option<usize>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls: Calls = Arc::default();
        let windows: Windows = Arc::default();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let seen = calls.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (client, upstream, windows, seen) = (
                    client.clone(),
                    upstream.clone(),
                    windows.clone(),
                    seen.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (client, upstream, windows, seen) = (
                            client.clone(),
                            upstream.clone(),
                            windows.clone(),
                            seen.clone(),
                        );
                        async move {
                            Ok::<_, Infallible>(
                                proxy(req, &client, &upstream, limit, &windows, &seen).await,
                            )
                        }
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

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Windows = Arc<Mutex<HashMap<String, VecDeque<Instant>>>>;

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

async fn proxy(
    req: hyper::Request<hyper::body::Incoming>,
    client: &Client,
    upstream: &str,
    limit: Option<usize>,
    windows: &Mutex<HashMap<String, VecDeque<Instant>>>,
    seen: &Mutex<Vec<Call>>,
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
    let action = params
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "unknown".into());
    let now = Instant::now();
    let region = region_of(&parts.headers);
    let throttle = limit.is_some_and(|limit| {
        let mut windows = windows.lock().expect("windows");
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
    seen.lock().expect("seen").push(Call {
        at: now,
        action,
        region,
        filters: filters_of(&params),
        next_page: params.iter().any(|(k, _)| k == "NextToken"),
        throttled: throttle,
    });
    if throttle {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                   <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>\
                   </Error></Errors><RequestID>throttling-proxy</RequestID></Response>";
        return hyper::Response::builder()
            .status(503)
            .header("content-type", "text/xml;charset=UTF-8")
            .body(Full::new(Bytes::from(xml)))
            .unwrap_or_default();
    }
    let uri = format!(
        "{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut forward = hyper::Request::builder().method(parts.method).uri(uri);
    for (k, v) in &parts.headers {
        forward = forward.header(k, v);
    }
    let Ok(forward) = forward.body(Full::new(body)) else {
        return bad_gateway();
    };
    match client.request(forward).await {
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

fn bad_gateway() -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"bad gateway")));
    *r.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    r
}
