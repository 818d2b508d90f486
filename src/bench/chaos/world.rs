//! The soak's world: a PostgreSQL cluster it can restart, moto and aiosmtpd as child processes
//! it can pause, the Kubernetes test server in this process, and the engine processes
//! (`setpoint dev` on those shared peers) it kills, pauses and starts again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use setpoint_kubernetes::TestApiServer;
use sqlx::PgPool;

use super::{ChaosConfig, ChaosError};
use crate::dev::postgres::{ClusterOptions, TempCluster, free_port};
use crate::store;

/// The region every instance of the soak lives in.
pub const REGION: &str = "us-east-1";
/// The tenant of the soak's instances (`setpoint dev`'s default).
pub const TENANT: &str = "demo";

/// A child process in a process group of its own; the group is killed when dropped.
pub struct Group {
    child: Child,
}

impl Group {
    fn spawn(mut cmd: Command, log: &Path) -> Result<Self, ChaosError> {
        use std::os::unix::process::CommandExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| ChaosError::Io(log.display().to_string(), e))?;
        let err = file
            .try_clone()
            .map_err(|e| ChaosError::Io(log.display().to_string(), e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| ChaosError::Setup(format!("cannot start {cmd:?}: {e}")))?;
        Ok(Self { child })
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the whole group.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([
                &format!("-{signal}"),
                "--",
                &format!("-{}", self.child.id()),
            ])
            .stderr(Stdio::null())
            .status();
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // A stopped process must be continued to die of anything but SIGKILL; SIGKILL works
        // on it as it is.
        self.signal("KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One engine process slot: its fixed API port, its log, and the process while it runs.
struct Slot {
    port: u16,
    log: PathBuf,
    info: PathBuf,
    proc: Option<Group>,
    /// The soak killed it and has not started it again yet: do not restart it behind the
    /// schedule's back.
    down: bool,
}

/// Everything the soak runs.
pub struct World {
    dir: PathBuf,
    binary: PathBuf,
    lease: Duration,
    resync: Option<Duration>,
    orphan_sweep: Option<Duration>,
    extra_flags: Vec<String>,
    pg: TempCluster,
    db_url: String,
    pool: PgPool,
    moto: Group,
    moto_url: String,
    smtp: Group,
    smtp_addr: String,
    pub(super) maildir: PathBuf,
    k8s: TestApiServer,
    slots: Vec<Slot>,
    token: String,
    /// Engine starts that failed (the process exited on its own, e.g. with PostgreSQL down)
    /// and were started again.
    pub(super) failed_starts: usize,
}

impl World {
    /// Starts PostgreSQL, moto, aiosmtpd, the Kubernetes test server and the engines, and
    /// waits until the first engine serves.
    pub async fn start(config: &ChaosConfig) -> Result<Self, ChaosError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| ChaosError::Io(dir.display().to_string(), e))?;
        let pg = tokio::task::spawn_blocking(move || {
            TempCluster::start(ClusterOptions {
                max_connections: 300,
                ..ClusterOptions::default()
            })
        })
        .await
        .map_err(|e| ChaosError::Setup(format!("starting PostgreSQL: {e}")))??;
        // Stopped and removed even if this process dies without dropping it.
        pg.stop_when_process_exits(std::process::id())?;
        let db_url = pg.url("postgres");
        let pool = store::connect(&db_url, 4).await?;
        store::migrate(&pool).await?;

        let moto_port = free_port()?;
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("exec python3 -m moto.server -H 127.0.0.1 -p {moto_port}"),
        ]);
        let moto = Group::spawn(cmd, &dir.join("moto.log"))?;
        let smtp_port = free_port()?;
        let maildir = dir.join("mail");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!(
                "exec python3 -m aiosmtpd -n -l 127.0.0.1:{smtp_port} -c aiosmtpd.handlers.Mailbox '{}'",
                maildir.display()
            ),
        ]);
        let smtp = Group::spawn(cmd, &dir.join("smtp.log"))?;
        let k8s = TestApiServer::start()
            .await
            .map_err(|e| ChaosError::Setup(format!("the Kubernetes test server: {e}")))?;
        wait_port(moto_port, "moto").await?;
        wait_port(smtp_port, "aiosmtpd").await?;

        // Flags the engine binary may not know (an older release): passed only when its help
        // lists them.
        let help = Command::new(&config.engine_binary)
            .args(["dev", "--help"])
            .output()
            .map_err(|e| {
                ChaosError::Setup(format!(
                    "cannot run {}: {e}",
                    config.engine_binary.display()
                ))
            })?;
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let mut extra_flags = Vec::new();
        if help.contains("--regions") {
            extra_flags.extend(["--regions".to_owned(), REGION.to_owned()]);
        }
        if help.contains("--backoff-cap") {
            extra_flags.extend([
                "--backoff-cap".to_owned(),
                format!("{}ms", config.backoff_cap.as_millis()),
            ]);
        }

        // The orphan sweep, when the binary can be told to terminate.
        let orphan_sweep = config
            .orphan_sweep
            .filter(|_| help.contains("--orphans-terminate"));
        if let Some(interval) = orphan_sweep {
            extra_flags.extend([
                "--orphans-interval".to_owned(),
                format!("{}ms", interval.as_millis()),
                "--orphans-terminate".to_owned(),
                "--orphans-min-age".to_owned(),
                "0s".to_owned(),
            ]);
        }

        let mut slots = Vec::new();
        for i in 0..config.engines {
            slots.push(Slot {
                port: free_port()?,
                log: dir.join(format!("engine-{i}.log")),
                info: dir.join(format!("engine-{i}.json")),
                proc: None,
                down: false,
            });
        }
        let mut world = Self {
            dir: dir.clone(),
            binary: config.engine_binary.clone(),
            lease: config.lease,
            resync: config.resync,
            orphan_sweep,
            extra_flags,
            pg,
            db_url,
            pool,
            moto,
            moto_url: format!("http://127.0.0.1:{moto_port}"),
            smtp,
            smtp_addr: format!("127.0.0.1:{smtp_port}"),
            maildir,
            k8s,
            slots,
            token: String::new(),
            failed_starts: 0,
        };
        // The first engine alone, so that the secrets key shared through the engines' folder
        // is made once; then the others.
        world.spawn_engine(0)?;
        let info = wait_info(&world.slots[0].info).await?;
        world.token = info["tenant_token"]
            .as_str()
            .ok_or_else(|| ChaosError::Setup("the engine's info file has no token".into()))?
            .to_owned();
        for i in 1..world.slots.len() {
            world.spawn_engine(i)?;
        }
        for i in 1..world.slots.len() {
            wait_info(&world.slots[i].info).await?;
        }
        Ok(world)
    }

    /// The API address of each engine slot (fixed across restarts).
    pub fn endpoints(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The interval of the engines' orphan sweep, when they run one that terminates.
    pub fn orphan_sweep(&self) -> Option<Duration> {
        self.orphan_sweep
    }

    /// The tenant token the workload uses.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A pool on the soak's database (for the checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// moto's endpoint URL.
    pub fn moto_url(&self) -> &str {
        &self.moto_url
    }

    /// The Kubernetes test server's URL.
    pub fn k8s_url(&self) -> String {
        self.k8s.url()
    }

    fn spawn_engine(&mut self, i: usize) -> Result<(), ChaosError> {
        let slot = &self.slots[i];
        let _ = std::fs::remove_file(&slot.info);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("dev")
            .arg("--dir")
            .arg(self.dir.join("engines"))
            .args(["--database-url", &self.db_url])
            .args(["--ec2-endpoint", &self.moto_url])
            .args(["--smtp", &self.smtp_addr])
            .args(["--kubernetes-url", &self.k8s.url()])
            .args(["--lease", &format!("{}ms", self.lease.as_millis())])
            .args(["--poll-interval", "200ms"])
            .args(["--listen", &format!("127.0.0.1:{}", slot.port)])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--info-file")
            .arg(&slot.info)
            .args(&self.extra_flags)
            .env("RUST_LOG", "info,sqlx=warn")
            .env("SETPOINT_LOG_FORMAT", "text")
            // `dev` serves the web console on 127.0.0.1:8080 by default: the soak's engines run
            // side by side, so each takes a free port (a binary without a console ignores it).
            .env("SETPOINT_CONSOLE_LISTEN", "127.0.0.1:0");
        if let Some(r) = self.resync {
            cmd.args(["--resync-interval", &format!("{}ms", r.as_millis())]);
        }
        let proc = Group::spawn(cmd, &slot.log)?;
        let slot = &mut self.slots[i];
        slot.proc = Some(proc);
        slot.down = false;
        Ok(())
    }

    /// SIGKILL to engine `i`; it stays down until [`World::start_engine`].
    pub fn kill_engine(&mut self, i: usize) {
        if let Some(p) = self.slots[i].proc.take() {
            p.signal("KILL");
            drop(p);
        }
        self.slots[i].down = true;
    }

    /// Starts engine `i` again (after a kill).
    pub fn start_engine(&mut self, i: usize) {
        if self.slots[i].proc.is_some() {
            return;
        }
        if let Err(e) = self.spawn_engine(i) {
            tracing::warn!(error = %e, engine = i, "chaos: starting an engine failed; the supervisor retries");
            self.slots[i].down = false;
        }
    }

    /// SIGSTOP (`stop`) or SIGCONT to engine `i`.
    pub fn pause_engine(&self, i: usize, stop: bool) {
        if let Some(p) = &self.slots[i].proc {
            p.signal(if stop { "STOP" } else { "CONT" });
        }
    }

    /// SIGSTOP or SIGCONT to moto.
    pub fn pause_moto(&self, stop: bool) {
        self.moto.signal(if stop { "STOP" } else { "CONT" });
    }

    /// SIGSTOP or SIGCONT to aiosmtpd.
    pub fn pause_smtp(&self, stop: bool) {
        self.smtp.signal(if stop { "STOP" } else { "CONT" });
    }

    /// Stops PostgreSQL (fast shutdown: every session is cut).
    pub async fn stop_postgres(&mut self) -> Result<(), ChaosError> {
        let pg = &mut self.pg;
        tokio::task::block_in_place(|| pg.stop_server())?;
        Ok(())
    }

    /// Starts PostgreSQL again.
    pub async fn start_postgres(&mut self) -> Result<(), ChaosError> {
        let pg = &mut self.pg;
        tokio::task::block_in_place(|| pg.start_server())?;
        Ok(())
    }

    /// Starts again every engine that exited on its own (not one the schedule keeps down);
    /// returns how many.
    pub fn supervise(&mut self) -> usize {
        let mut restarted = 0;
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if slot.down {
                continue;
            }
            let exited = slot.proc.as_mut().is_none_or(Group::exited);
            if exited {
                slot.proc = None;
                if self.spawn_engine(i).is_ok() {
                    restarted += 1;
                }
            }
        }
        self.failed_starts += restarted;
        restarted
    }

    /// After the faults: every peer continued, PostgreSQL up, every engine running.
    pub async fn ensure_all_up(&mut self) {
        self.pause_moto(false);
        self.pause_smtp(false);
        let _ = self.start_postgres().await;
        for i in 0..self.slots.len() {
            self.pause_engine(i, false);
            if self.slots[i].proc.is_none() {
                self.start_engine(i);
            }
            self.slots[i].down = false;
        }
        self.supervise();
    }

    /// Stops the engines, the peers and PostgreSQL.
    pub async fn stop(mut self) {
        for s in &mut self.slots {
            s.proc = None;
        }
        self.pool.close().await;
        self.k8s.stop().await;
        // moto, aiosmtpd and PostgreSQL stop as their owners drop.
    }
}

/// Waits until something listens on 127.0.0.1:`port`.
async fn wait_port(port: u16, what: &str) -> Result<(), ChaosError> {
    for _ in 0..600 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ChaosError::Setup(format!(
        "{what} did not listen on port {port} within a minute (is it installed?)"
    )))
}

/// Waits for an engine's info file (written once its API serves).
async fn wait_info(path: &Path) -> Result<serde_json::Value, ChaosError> {
    for _ in 0..1200 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(ChaosError::Setup(format!(
        "no engine wrote {} within two minutes; see its log",
        path.display()
    )))
}
