//! Peers started by tests as child processes: moto, aiosmtpd, and the Kubernetes test server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed (its whole process group) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    setpoint::dev::postgres::free_port().expect("free port")
}

/// Runs `script` with `sh` in a process group of its own, output into `log`.
pub fn spawn(script: &str, log: &Path) -> Proc {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log).expect("log");
    Proc(
        Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn"),
    )
}

/// Waits until something listens on 127.0.0.1:`port`.
pub async fn wait_port(port: u16) {
    super::wait_for("a peer to listen", || async move {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    })
    .await;
}

/// The peers an engine under test talks to, started by the test: moto, aiosmtpd and the
/// Kubernetes test server. Stopped when dropped.
pub struct Peers {
    _moto: Proc,
    _smtp: Proc,
    pub k8s: setpoint_kubernetes::TestApiServer,
    /// moto's endpoint URL.
    pub moto: String,
    /// The SMTP server's host:port.
    pub smtp: String,
    /// Where delivered mail lands.
    pub maildir: PathBuf,
    /// moto's port.
    pub moto_port: u16,
    /// The SMTP server's port.
    pub smtp_port: u16,
}

impl Peers {
    /// Starts the peers, logging into `dir`, and waits until they listen.
    pub async fn start(dir: &Path) -> Self {
        let moto_port = free_port();
        let moto = spawn(
            &format!("exec python3 -m moto.server -H 127.0.0.1 -p {moto_port}"),
            &dir.join("moto.log"),
        );
        let smtp_port = free_port();
        let maildir = dir.join("mail");
        let smtp = spawn(
            &format!(
                "exec python3 -m aiosmtpd -n -l 127.0.0.1:{smtp_port} -c aiosmtpd.handlers.Mailbox '{}'",
                maildir.display()
            ),
            &dir.join("smtp.log"),
        );
        let k8s = setpoint_kubernetes::TestApiServer::start()
            .await
            .expect("k8s");
        wait_port(moto_port).await;
        wait_port(smtp_port).await;
        Self {
            _moto: moto,
            _smtp: smtp,
            k8s,
            moto: format!("http://127.0.0.1:{moto_port}"),
            smtp: format!("127.0.0.1:{smtp_port}"),
            maildir,
            moto_port,
            smtp_port,
        }
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Subjects of the mails in the Maildir.
pub fn subjects(maildir: &Path) -> Vec<String> {
    header_values(maildir, "Subject")
        .into_iter()
        .flatten()
        .collect()
}

/// The first value of header `name` (any case) in each mail of the Maildir, one entry per
/// stored mail (`None` for a mail without it).
pub fn header_values(maildir: &Path, name: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for dir in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.push(text.lines().find_map(|l| {
                let (header, value) = l.split_once(':')?;
                header
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            }));
        }
    }
    out
}

/// `setpoint dev` as a child process (its own process group, killed on drop) with `extra`
/// flags and environment `env`, logging into `dir/dev.log`; returns it with its info file
/// once it serves.
pub async fn start_dev(
    dir: &Path,
    extra: &[String],
    env: &[(&str, &str)],
) -> (Proc, serde_json::Value) {
    use std::os::unix::process::CommandExt;
    let info = dir.join("info.json");
    let _ = std::fs::remove_file(&info);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))
        .expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_setpoint"))
        .arg("dev")
        .arg("--dir")
        .arg(dir.join("stack"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        // A port of its own unless the test picks one (tests run side by side).
        .args(
            (!extra.iter().any(|a| a == "--listen"))
                .then_some(["--listen", "127.0.0.1:0"])
                .into_iter()
                .flatten(),
        )
        .arg("--info-file")
        .arg(&info)
        .args(extra)
        // The web console is on by default in dev, at 127.0.0.1:8080: a port of its own, so
        // that stacks side by side do not collide (a flag in `extra` wins; a release before
        // the console ignores the variable).
        .env("SETPOINT_CONSOLE_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,sqlx=warn")
        .envs(env.iter().copied())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("setpoint dev");
    let proc = Proc(child);
    let value = super::wait_for("setpoint dev to start", || {
        let info = info.clone();
        async move {
            let text = std::fs::read_to_string(&info).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        }
    })
    .await;
    (proc, value)
}

/// A fresh directory for one test under the system's temp dir.
pub fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("setpoint-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// Runs python3 `script` with `args`; its standard output parsed as JSON.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}
