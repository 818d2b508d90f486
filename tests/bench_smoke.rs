//! The benchmarks run as a user runs them (`setpoint bench …` on a throw-away durable cluster),
//! briefly: they must keep working and report their figures. No figure is asserted on; speed
//! is read from the printed figures, never from a test.

mod common;

use common::setpoint;

#[test]
fn bench_api_reports_creates_next_to_the_commit_rate_with_the_cpu_per_create_and_its_floor() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "api",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert!(
        report["baseline_commits_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert!(report["creates_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(report["create_errors"], 0, "{out}");
    // The two parts every Create holds, measured on their own.
    assert!(
        report["batched_writes_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert!(
        report["empty_calls_per_sec"].as_f64().unwrap() > 0.0,
        "{out}"
    );
    assert_eq!(report["floor_errors"], 0, "{out}");
    // The cluster runs on this machine, so where the CPU went is known.
    let cpu = &report["cpu"];
    for field in [
        "baseline_postgres_us",
        "baseline_process_us",
        "create_postgres_us",
        "create_process_us",
        "create_ceiling_per_sec",
        "batched_write_postgres_us",
        "batched_write_process_us",
        "empty_call_process_us",
        "floor_ceiling_per_sec",
    ] {
        assert!(
            cpu[field].as_f64().is_some_and(|v| v > 0.0),
            "{field}: {out}"
        );
    }
}

#[test]
fn bench_queue_reports_enqueue_and_drain_rates_on_a_durable_cluster() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "queue",
            "--jobs",
            "2000",
            "--workers",
            "50",
            "--latency-rate",
            "0",
            "--baseline-cycles",
            "0",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let drain = &v["report"]["drains"][0];
    assert_eq!(drain["jobs"], 2000, "{out}");
    assert!(drain["drain_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    assert!(drain["enqueue_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    let settings = v["settings"].to_string();
    assert!(
        settings.contains(r#"["fsync","on"]"#)
            && settings.contains(r#"["synchronous_commit","on"]"#),
        "the benchmark runs durable: {settings}"
    );
}

#[test]
fn bench_scale_reports_create_latency_drift_rate_and_table_sizes() {
    let (ok, out, err) = setpoint(
        None,
        &[
            "bench",
            "scale",
            "--resources",
            "2000",
            "--tenants",
            "10",
            "--drift-interval",
            "20s",
            "--adapter-latency",
            "5ms",
            "--create-rate",
            "20",
            "--duration",
            "2s",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(r["resources"], 2000, "{out}");
    assert_eq!(r["create_errors"], 0, "{out}");
    let creates = r["creates"].as_u64().unwrap();
    assert!(creates > 0, "{out}");
    // Every accepted create reached its first adapter call and READY.
    assert_eq!(
        r["commit_to_first_call"]["n"].as_u64(),
        Some(creates),
        "{out}"
    );
    assert_eq!(r["create_to_ready"]["n"].as_u64(), Some(creates), "{out}");
    assert!(r["drift_checks_per_sec"].as_f64().unwrap() > 0.0, "{out}");
    let tables: Vec<&str> = r["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        [
            "instances",
            "drift_schedule",
            "work",
            "work_events",
            "api_requests"
        ],
        "{out}"
    );
}

/// A benchmark stopped by SIGTERM or Ctrl-C (SIGINT) stops and removes its throw-away
/// PostgreSQL: no server keeps running and no data folder is left behind.
#[test]
fn an_interrupted_bench_leaves_no_cluster_behind() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut bench = Terminated(
            Command::new(env!("CARGO_BIN_EXE_setpoint"))
                .args(["bench", "queue", "--jobs", "5000000", "--latency-rate", "0"])
                .args(["--baseline-cycles", "0"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
        // Reads below block: a bench that hangs is killed after HUNG, failing the test
        // instead of hanging the suite.
        let (done, watched) = std::sync::mpsc::channel::<()>();
        let pid = bench.0.id() as i32;
        let watchdog = std::thread::spawn(move || {
            // Only a timeout: a sender dropped by a failing test leaves the child to
            // `Terminated`, which lets the bench clean up.
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                watched.recv_timeout(common::HUNG)
            {
                // SAFETY: kill(2) of the child, not yet reaped: the test is still reading its
                // output, and waits for this thread before it waits for the child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let mut stderr = BufReader::new(bench.0.stderr.take().expect("stderr"));
        let mut seen = String::new();
        // Once it enqueues, its cluster runs (the warm-up drained through it).
        while !seen.contains("enqueueing 5000000") {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).expect("read");
            assert!(n > 0, "the bench ended before enqueueing:\n{seen}");
            seen.push_str(&line);
        }
        let dir = seen
            .lines()
            .find_map(|l| l.strip_prefix("bench: PostgreSQL runs in "))
            .and_then(|l| l.split(" (").next())
            .unwrap_or_else(|| panic!("no cluster folder in:\n{seen}"))
            .to_owned();
        let pid_file = std::fs::read_to_string(format!("{dir}/data/postmaster.pid"))
            .unwrap_or_else(|e| panic!("{dir}/data/postmaster.pid: {e}"));
        let server: i32 = pid_file.lines().next().expect("pid").parse().expect("pid");

        // SAFETY: kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(bench.0.id() as i32, signal) }, 0);
        let mut rest = String::new();
        stderr.read_to_string(&mut rest).expect("read");
        let _ = done.send(());
        watchdog.join().expect("watchdog");
        let status = bench.0.wait().expect("wait");
        assert!(!status.success(), "signal {signal}: {status:?}");
        assert!(rest.contains("interrupted"), "signal {signal}:\n{rest}");
        assert!(
            !std::path::Path::new(&dir).exists(),
            "signal {signal}: {dir} is left"
        );
        // The postmaster removes its pid file, then exits: it may take a moment to be gone.
        let started = std::time::Instant::now();
        while !exited(server) {
            assert!(
                started.elapsed() < common::HUNG,
                "signal {signal}: PostgreSQL {server} still runs"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// A child process sent SIGTERM (what the bench cleans up on) when the test ends early.
struct Terminated(std::process::Child);

impl Drop for Terminated {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z"),
    }
}
