//! Test harness: a real SMTP server (aiosmtpd, driven by `smtp_server.py` next to this folder)
//! started per test on its own port and Maildir, and helpers to read what it received.

#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use serde_json::Value;
use setpoint_adapter::{AdapterError, Begun, Entry, Fence, Journal, MemoryJournal};
use setpoint_email::{Security, SmtpConfig};

/// What the test server should demand.
#[derive(Debug, Default, Clone)]
pub struct ServerOptions {
    /// Listen on this port (0 or `None`: any free one).
    pub port: Option<u16>,
    /// Require AUTH with this `(user, password)`.
    pub auth: Option<(String, String)>,
    /// Offer only these AUTH mechanisms, e.g. `"LOGIN"`.
    pub mechanisms: Option<String>,
    /// Offer and require STARTTLS with this certificate chain and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: TLS from the first byte (SMTPS) instead of STARTTLS.
    pub implicit_tls: bool,
}

/// A running aiosmtpd; killed (by its pid) and its directory removed on drop.
pub struct SmtpServer {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// Where accepted messages land.
    pub maildir: PathBuf,
    dir: PathBuf,
}

/// A fresh, empty scratch directory for one test.
pub fn scratch_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "setpoint-email-test-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn ensure_aiosmtpd() {
    let ok = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "these tests need aiosmtpd: `python3 -m pip install aiosmtpd` (scripts/install-deps.sh \
         does it)"
    );
}

impl SmtpServer {
    /// Starts a server and waits until it listens (it prints its port once bound).
    pub fn start(options: ServerOptions) -> Self {
        ensure_aiosmtpd();
        let dir = scratch_dir();
        let maildir = dir.join("maildir");
        let log = std::fs::File::create(dir.join("server.log")).expect("server log");
        let script = package_dir().join("tests/smtp_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--maildir")
            .arg(&maildir)
            .arg("--port")
            .arg(options.port.unwrap_or(0).to_string());
        if let Some((user, password)) = &options.auth {
            cmd.arg("--auth").arg(format!("{user}:{password}"));
        }
        if let Some(m) = &options.mechanisms {
            cmd.arg("--mechanisms").arg(m);
        }
        if let Some((cert, key)) = &options.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            if options.implicit_tls {
                cmd.arg("--implicit-tls");
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn python3 smtp_server.py");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("child stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the server's PORT line");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                panic!("the SMTP test server did not start (stdout {line:?}):\n{log}")
            });
        Self {
            child,
            port,
            maildir,
            dir,
        }
    }

    /// Every message received so far, raw.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir.join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    out.push(text);
                }
            }
        }
        out
    }

    /// The messages whose `Message-ID` header is exactly `message_id`.
    pub fn with_message_id(&self, message_id: &str) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter(|m| header(m, "Message-ID").as_deref() == Some(message_id))
            .collect()
    }

    /// A mailer configuration for this server: plain SMTP, short timeouts.
    pub fn config(&self) -> SmtpConfig {
        config_for_port(self.port)
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain-SMTP configuration for 127.0.0.1:`port`.
pub fn config_for_port(port: u16) -> SmtpConfig {
    let mut cfg = SmtpConfig::new("127.0.0.1", "setpoint <noreply@setpoint.test>");
    cfg.port = Some(port);
    cfg.security = Security::None;
    cfg.hello_name = Some("client.test".into());
    cfg.connect_timeout_secs = 10;
    cfg.command_timeout_secs = 10;
    cfg.data_timeout_secs = 10;
    cfg
}

/// The unfolded value of the first header `name` of a raw message (case-insensitive).
pub fn header(message: &str, name: &str) -> Option<String> {
    let mut lines = message.lines().take_while(|l| !l.is_empty()).peekable();
    while let Some(line) = lines.next() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.eq_ignore_ascii_case(name) {
            let mut value = value.trim().to_owned();
            while let Some(next) = lines.peek() {
                if next.starts_with([' ', '\t']) {
                    value.push(' ');
                    value.push_str(next.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            return Some(value);
        }
    }
    None
}

/// A journal that records `begin` durably but loses every `finish`: what the engine's journal
/// looks like after a process died between the SMTP transaction and recording its result.
pub struct CrashBeforeFinish<'a>(pub &'a MemoryJournal);

type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Journal for CrashBeforeFinish<'_> {
    fn look<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Entry, AdapterError>> {
        self.0.look(key)
    }

    fn begin<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Begun, AdapterError>> {
        self.0.begin(key)
    }

    fn finish<'a>(
        &'a self,
        _key: &'a str,
        _result: &'a Value,
    ) -> Fut<'a, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What the journal holds for `key` (read without changing anything).
pub async fn journal_value(journal: &MemoryJournal, key: &str) -> Entry {
    journal.look(key).await.expect("journal look")
}

/// A journal that loses `fence` right after its first `look` (`on_look`) or its first `begin`
/// (otherwise): an attempt whose unit is lost at an exact step of a send.
pub struct LosesFence<'a> {
    /// The journal that stores.
    pub inner: &'a MemoryJournal,
    /// The attempt's fence.
    pub fence: Fence,
    /// Lose it after `look` instead of after `begin`.
    pub on_look: bool,
}

impl Journal for LosesFence<'_> {
    fn look<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Entry, AdapterError>> {
        Box::pin(async move {
            let entry = self.inner.look(key).await;
            if self.on_look {
                self.fence.lose("test: lost after the journal was read");
            }
            entry
        })
    }

    fn begin<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            let begun = self.inner.begin(key).await;
            if !self.on_look {
                self.fence.lose("test: lost while the slot was begun");
            }
            begun
        })
    }

    fn finish<'a>(&'a self, key: &'a str, result: &'a Value) -> Fut<'a, Result<(), AdapterError>> {
        self.inner.finish(key, result)
    }
}

/// A journal on which another attempt of the same unit acts once, right before this attempt
/// first begins a slot: it begins that slot itself and, when `finish_with` is set, finishes it
/// with that value (a concurrent attempt that won the race for the slot).
pub struct ConcurrentAttempt<'a> {
    inner: &'a MemoryJournal,
    finish_with: Option<Value>,
    acted: AtomicBool,
}

impl<'a> ConcurrentAttempt<'a> {
    /// The other attempt records `finish_with` (or nothing) in `inner`.
    pub fn new(inner: &'a MemoryJournal, finish_with: Option<Value>) -> Self {
        Self {
            inner,
            finish_with,
            acted: AtomicBool::new(false),
        }
    }
}

impl Journal for ConcurrentAttempt<'_> {
    fn look<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Entry, AdapterError>> {
        self.inner.look(key)
    }

    fn begin<'a>(&'a self, key: &'a str) -> Fut<'a, Result<Begun, AdapterError>> {
        Box::pin(async move {
            if !self.acted.swap(true, Ordering::SeqCst) {
                self.inner.begin(key).await?;
                if let Some(value) = &self.finish_with {
                    self.inner.finish(key, value).await?;
                }
            }
            self.inner.begin(key).await
        })
    }

    fn finish<'a>(&'a self, key: &'a str, result: &'a Value) -> Fut<'a, Result<(), AdapterError>> {
        self.inner.finish(key, result)
    }
}

/// A throw-away CA and a server certificate for `IP:127.0.0.1` signed by it, made with the
/// `openssl` command in `dir`: returns `(ca.pem, server.pem, server.key)`.
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("these tests need the openssl command (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=setpoint test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// The package's directory, as cargo gives it to the running test: `env!` alone would keep
/// the directory of the checkout the binary was built in, and cargo reuses a test binary that
/// another checkout of the same sources built into a shared `CARGO_TARGET_DIR`.
pub fn package_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
