//! Throw-away PostgreSQL clusters for `setpoint dev`, `setpoint bench` and the tests.
//!
//! A cluster lives in its own folder with its own port and is removed when its handle is
//! dropped. PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
//! user (`runuser`). An initdb'd template is kept in a cache folder and copied, which makes a
//! new cluster about five times faster to start than running initdb each time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a throw-away cluster could not be made or controlled.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The PostgreSQL server binaries are not installed.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found under /usr/lib/postgresql/*/bin \
         or SETPOINT_PG_BIN; install them with `apt-get install -y postgresql` \
         (or run scripts/install-deps.sh)"
    )]
    NotInstalled,
    /// A command failed.
    #[error("`{command}` failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// An I/O error on the cluster's folder.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The server did not accept connections in time.
    #[error("PostgreSQL did not start within {0:?}; see its log at {1}")]
    StartTimeout(Duration, PathBuf),
}

/// How a throw-away cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults: fsync and synchronous_commit on. Benchmarks use this.
    Durable,
    /// fsync, synchronous_commit and full_page_writes off: for tests, which never survive a
    /// machine crash anyway.
    Fast,
}

/// Settings of a throw-away cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Durability settings.
    pub durability: Durability,
    /// Parent folder of the cluster's folder (default: the system temp folder).
    pub base_dir: Option<PathBuf>,
    /// Port; `None` picks a free one.
    pub port: Option<u16>,
    /// `max_connections`.
    pub max_connections: u32,
    /// Keep the folder when the handle is dropped (for `setpoint dev --data-dir`).
    pub persistent: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Fast,
            base_dir: None,
            port: None,
            max_connections: 200,
            persistent: false,
        }
    }
}

/// A running throw-away PostgreSQL cluster. Dropping it stops the server and, unless it is
/// persistent, removes its folder.
#[derive(Debug)]
pub struct TempCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    options: ClusterOptions,
    running: bool,
}

fn is_root() -> bool {
    // SAFETY-free check: root's home and uid show in `id -u`; avoid a libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The folder holding initdb and pg_ctl: `SETPOINT_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else the folder of `pg_ctl` on PATH.
pub fn pg_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Ok(dir) = std::env::var("SETPOINT_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    Err(ClusterError::NotInstalled)
}

fn run(mut cmd: Command, as_postgres: bool) -> Result<String, ClusterError> {
    if as_postgres {
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = Command::new("runuser");
        wrapped
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args);
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                wrapped.env(k, v);
            }
        }
        cmd = wrapped;
    }
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ClusterError::Io {
            context: format!("running {line}"),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(ClusterError::Command {
            command: line,
            output: text,
        })
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// A port on 127.0.0.1 that was free a moment ago, and that the kernel will not hand to
/// anyone else meanwhile: it is picked below the ephemeral range.
///
/// The caller binds it later (a child process, a server started after a config is written).
/// A port the kernel chose for `127.0.0.1:0` comes from its ephemeral range, from which every
/// outgoing connection and every other `:0` listener also draws, so between the pick and the
/// bind another socket could take it (seen: `setpoint dev` failing with "Address already in
/// use" in the test suite). Ports below that range are handed out by nobody; each pick is
/// random, checked by binding, and never repeated within the process.
pub fn free_port() -> Result<u16, ClusterError> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u16, low.max(10_001));
    for _ in 0..200 {
        let n = (uuid::Uuid::new_v4().as_u128() % u128::from(to - from)) as u16;
        let port = from + n;
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
    Ok(l.local_addr().map_err(io("reading a bound port"))?.port())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("SETPOINT_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/setpoint"))
}

impl TempCluster {
    /// Makes and starts a new cluster.
    ///
    /// # Errors
    /// When PostgreSQL is not installed, the folder cannot be made, or the server does not
    /// start within 60 seconds.
    pub fn start(options: ClusterOptions) -> Result<Self, ClusterError> {
        let bin = pg_bin_dir()?;
        let root = is_root();
        let base = options.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).map_err(io(format!("creating {}", base.display())))?;
        let dir = base.join(format!("setpoint-pg-{}", uuid::Uuid::new_v4().simple()));
        Self::init_from_template(&bin, &dir, root)?;
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut cluster = Self {
            dir,
            bin,
            port,
            options,
            running: false,
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Opens (or makes, on first use) a cluster kept in `dir`, for `setpoint dev`.
    pub fn open_persistent(dir: &Path, mut options: ClusterOptions) -> Result<Self, ClusterError> {
        let bin = pg_bin_dir()?;
        let root = is_root();
        if !dir.join("data/PG_VERSION").exists() {
            Self::init_from_template(&bin, dir, root)?;
        }
        options.persistent = true;
        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut cluster = Self {
            dir: dir.to_owned(),
            bin,
            port,
            options,
            running: false,
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    fn init_from_template(bin: &Path, dir: &Path, root: bool) -> Result<(), ClusterError> {
        let version = bin
            .parent()
            .and_then(|p| p.file_name())
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pg".into());
        let template = cache_dir().join(format!("pg-template-{version}"));
        if !template.join("data/PG_VERSION").exists() {
            // initdb into a private folder, then rename: parallel test binaries may race here.
            let staging =
                cache_dir().join(format!("pg-template-{}", uuid::Uuid::new_v4().simple()));
            Self::make_owned_dir(&staging, root)?;
            let mut initdb = Command::new(bin.join("initdb"));
            initdb.arg("-D").arg(staging.join("data")).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]);
            run(initdb, root)?;
            if std::fs::rename(&staging, &template).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        Self::make_owned_dir(dir, root)?;
        let mut cp = Command::new("cp");
        cp.arg("-a")
            .arg(template.join("data"))
            .arg(dir.join("data"));
        run(cp, root)?;
        Ok(())
    }

    fn make_owned_dir(dir: &Path, root: bool) -> Result<(), ClusterError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        if root {
            // The parent folders must be traversable by the postgres user.
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(dir);
            run(chown, false)?;
            if let Some(parent) = dir.parent() {
                let mut chmod = Command::new("chmod");
                chmod.arg("a+x").arg(parent);
                let _ = run(chmod, false);
            }
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("700").arg(dir);
        run(chmod, false)?;
        Ok(())
    }

    fn server_options(&self) -> String {
        let mut o = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c max_connections={} -c shared_buffers=256MB -c max_wal_size=4GB \
             -c checkpoint_timeout=30min -c log_min_messages=warning",
            self.port,
            self.dir.display(),
            self.options.max_connections
        );
        if self.options.durability == Durability::Fast {
            o.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        o
    }

    /// Starts the server of a stopped cluster (same folder, same port).
    pub fn start_server(&mut self) -> Result<(), ClusterError> {
        let root = is_root();
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(self.server_options())
            .arg("start");
        // Counted as running before pg_ctl returns: a start that fails or is interrupted (a
        // Ctrl-C reaches pg_ctl too) may have left a server that pg_ctl already detached, and
        // only a cluster marked running is stopped when dropped. Stopping no server is harmless.
        self.running = true;
        run(pg_ctl, root).map_err(|e| match e {
            ClusterError::Command { .. } => {
                ClusterError::StartTimeout(Duration::from_secs(60), self.dir.join("log"))
            }
            other => other,
        })?;
        // pg_ctl -w returns once the server accepts connections; double-check the TCP port.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(ClusterError::StartTimeout(
                    Duration::from_secs(30),
                    self.dir.join("log"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: connections are closed), keeping the folder.
    pub fn stop_server(&mut self) -> Result<(), ClusterError> {
        self.stop_with("fast")
    }

    fn stop_with(&mut self, mode: &str) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        let mut pg_ctl = Command::new(self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", mode, "-w", "stop"]);
        run(pg_ctl, is_root())?;
        self.running = false;
        Ok(())
    }

    /// Stops and removes the cluster when process `pid` ends, even if this handle is never
    /// dropped (a `static` in a test binary): a small shell watchdog outlives nothing else.
    pub fn stop_when_process_exits(&self, pid: u32) -> Result<(), ClusterError> {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.dir.join("data");
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {runas}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            runas = if is_root() {
                "runuser -u postgres -- "
            } else {
                ""
            },
            pg_ctl = pg_ctl.display(),
            data = data.display(),
            dir = self.dir.display(),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting the cluster watchdog"))?;
        Ok(())
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let mode = if self.options.persistent {
            "fast"
        } else {
            "immediate"
        };
        let _ = self.stop_with(mode);
        if !self.options.persistent {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
