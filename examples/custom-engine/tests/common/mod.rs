//! What the tests share: a real HTTP webhook receiver, fresh databases, and waiting.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long any wait may take before the test is declared hung.
pub const HUNG: Duration = Duration::from_secs(120);

/// The signing secret of the tests: long and recognisable, so that a leak is found by search.
pub const SECRET: &str = "whsec-TEST-7f3a9c1e5b2d4f60-never-log-me";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub key: Option<String>,
    pub signature: Option<String>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A webhook endpoint on 127.0.0.1 that records every request and answers by the body's
/// `event`: `flaky` gets 503 on its key's first request and 200 after; `refused` always gets
/// 400; `slow` gets its answer after 3 s on its key's first request (past the engine's 2 s
/// timeout) and at once after; any other event gets 200.
pub struct Receiver {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(seen.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    /// The URL of its hook.
    pub fn url(&self) -> String {
        format!("http://{}/hooks/setpoint", self.addr)
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Received> {
        self.requests.lock().expect("requests").clone()
    }

    /// The requests whose body has `id` (the idempotency key).
    pub fn with_key(&self, key: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect()
    }

    /// Stops listening: connections are refused from now on.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    seen: Arc<Mutex<Vec<Received>>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    let (key, signature, content_type) = (
        header("idempotency-key"),
        header("x-setpoint-signature"),
        header("content-type"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let event = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["event"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let earlier = {
        let mut seen = seen.lock().expect("requests");
        let earlier = seen
            .iter()
            .filter(|r| r.key.is_some() && r.key == key)
            .count();
        seen.push(Received {
            method,
            path,
            key,
            signature,
            content_type,
            body,
        });
        earlier
    };
    let (status, text) = match (event.as_str(), earlier) {
        ("flaky", 0) => (StatusCode::SERVICE_UNAVAILABLE, "try again"),
        ("refused", _) => (StatusCode::BAD_REQUEST, "unknown event type: refused"),
        ("slow", 0) => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, "late")
        }
        _ => (StatusCode::OK, "ok"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    Ok(response)
}

/// Polls `f` until it returns `Some`, panicking after [`HUNG`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < HUNG, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database with setpoint's migrations, on this test process's throw-away PostgreSQL
/// cluster (setpoint's own test helper: it starts the cluster as the `postgres` user when run
/// as root, and removes it when the process exits).
pub async fn db() -> setpoint::dev::testdb::TestDb {
    setpoint::dev::testdb::test_db()
        .await
        .expect("a test database (PostgreSQL installed? see scripts/install-deps.sh)")
}
