//! Helpers of the console's tests: an engine in this process with the API and the console
//! (a test kind `test.note` whose steps succeed at once, and the probe kind), tokens for two
//! tenants and an admin, and a small HTTP client with a cookie jar, over plain HTTP or TLS.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use setpoint::api::ApiConfig;
use setpoint::api::auth::create_token;
use setpoint::console::ConsoleConfig;
use setpoint::dev::testdb::{TestDb, test_db};
use setpoint::engine::{Engine, EngineBuilder};
use setpoint::plugin::{ConfigContext, Plugin, PluginError, Registrar, Services};
use setpoint_adapter::{
    AdapterError, BoxFuture, ResourceKind, Step, StepDecl, StepInput, StepResult, WorkContext,
};
use tokio_util::sync::CancellationToken;

/// A step that succeeds at once, and reports what it wrote: the length of the note's text
/// (kept as the step's output in the resource's observed state).
struct Done;

impl Step for Done {
    fn run<'a>(
        &'a self,
        _ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        let chars = input
            .spec
            .get("text")
            .and_then(serde_json::Value::as_str)
            .map_or(0, |t| t.chars().count());
        Box::pin(async move { Ok(StepResult::next().output(json!({ "chars": chars }))) })
    }
}

/// Declares `test.note` (collection `notes`): a spec with a `text`, one step per chain.
pub struct Notes;

impl Plugin for Notes {
    fn name(&self) -> &str {
        "notes"
    }

    fn configure(&mut self, _cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        Ok(())
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        r.kind(
            ResourceKind::new("test.note", "notes")
                .describe("A note: text kept by the engine")
                .schema(
                    1,
                    json!({
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["text"],
                        "properties": {
                            "text": {"type": "string", "maxLength": 200},
                            "size": {"type": "integer", "minimum": 1}
                        }
                    }),
                )
                .create([StepDecl::new("write", "test.note.create")])
                .update([StepDecl::new("write", "test.note.update")])
                .delete([StepDecl::new("erase", "test.note.delete")]),
        )?;
        for k in ["test.note.create", "test.note.update", "test.note.delete"] {
            r.step(k, Arc::new(Done))?;
        }
        Ok(())
    }
}

/// An engine with the API and the console, on its own database.
pub struct Env {
    pub db: TestDb,
    pub console: String,
    /// The gRPC API's address (`http://…`).
    pub api: String,
    pub shutdown: CancellationToken,
    pub acme: String,
    pub globex: String,
    pub admin: String,
    engine: Option<Engine>,
}

impl Env {
    /// Starts it, with `api` settings (TLS or not).
    pub async fn start(api: ApiConfig) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let db = test_db().await.expect("test database");
        let shutdown = CancellationToken::new();
        let worker = setpoint::WorkerConfig {
            poll_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            backoff: setpoint::worker::Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(200),
            },
            ..setpoint::WorkerConfig::default()
        };
        let engine = EngineBuilder::new(db.pool.clone())
            .env(|_| None)
            .worker(worker)
            .probe(true)
            .plugin(Notes)
            .api("127.0.0.1:0".parse().unwrap(), api)
            .console("127.0.0.1:0".parse().unwrap(), ConsoleConfig::default())
            .start(shutdown.clone())
            .await
            .expect("engine starts");
        let token = |tenant: &'static str, admin: bool| {
            let pool = db.pool.clone();
            async move {
                create_token(&pool, tenant, admin, None)
                    .await
                    .unwrap()
                    .token
            }
        };
        let acme = token("acme", false).await;
        let globex = token("globex", false).await;
        let admin = token("ops", true).await;
        Env {
            console: engine.console_url.clone().expect("console url"),
            api: format!("http://{}", engine.api_addr.expect("API address")),
            db,
            shutdown,
            acme,
            globex,
            admin,
            engine: Some(engine),
        }
    }

    /// Stops the engine.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(e) = self.engine.take() {
            e.wait().await.unwrap();
        }
    }

    /// A browser-like client of the console, trusting `ca` (PEM) for HTTPS.
    pub fn client(&self, ca: Option<&[u8]>) -> Client {
        Client::new(&self.console, ca)
    }
}

/// An answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// The `Location` header.
    pub fn location(&self) -> String {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    /// Every `Set-Cookie` header.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }

    /// The value of the hidden input `name` (the first).
    pub fn hidden(&self, name: &str) -> String {
        let needle = format!("name=\"{name}\" value=\"");
        let at = self
            .body
            .find(&needle)
            .unwrap_or_else(|| panic!("no input {name} in {}", self.body));
        let rest = &self.body[at + needle.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

/// A client with a cookie jar. No redirects are followed: tests look at them.
pub struct Client {
    base: String,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    pub cookies: BTreeMap<String, String>,
}

impl Client {
    fn new(base: &str, ca: Option<&[u8]>) -> Client {
        let hostport = base.split("://").nth(1).unwrap();
        let tls = ca.map(|pem| {
            use rustls_pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                roots.add(c.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        });
        Client {
            base: base.to_owned(),
            addr: hostport.parse().unwrap(),
            tls,
            cookies: BTreeMap::new(),
        }
    }

    /// GET `path`.
    pub async fn get(&mut self, path: &str) -> Answer {
        self.send("GET", path, None, &[]).await
    }

    /// POST `fields` as a form to `path`.
    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send("POST", path, Some(body), &[]).await
    }

    /// POST with extra headers.
    pub async fn post_with(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send("POST", path, Some(body), headers).await
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        form: Option<String>,
        extra: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string());
        if !self.cookies.is_empty() {
            let jar = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            req = req.header(header::COOKIE, jar);
        }
        if form.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let res = match &self.tls {
            None => {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                sender.send_request(req).await.unwrap()
            }
            Some(tls) => {
                let name = rustls_pki_types::ServerName::IpAddress(self.addr.ip().into());
                let stream = tls.connect(name, tcp).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                sender.send_request(req).await.unwrap()
            }
        };
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let answer = Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        for c in answer.set_cookies() {
            let pair = c.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() || c.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        answer
    }

    /// Signs in with `token`; the answer of the sign-in POST.
    pub async fn sign_in(&mut self, token: &str) -> Answer {
        let form = self.get("/sign-in").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        let csrf = form.hidden("csrf");
        self.post("/sign-in", &[("csrf", &csrf), ("token", token)])
            .await
    }

    /// The session's CSRF token (from the resources page's sign-out form).
    pub async fn csrf(&mut self) -> String {
        let page = self.get("/resources").await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        page.hidden("csrf")
    }
}
