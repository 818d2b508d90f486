//! CPU time used by this process and by a PostgreSQL server on the same machine, for the
//! benchmarks: where a request's CPU goes says how far its throughput can rise on these cores.
//!
//! Read from `/proc` (Linux). Elsewhere, or for a server on another machine, the figures are
//! absent rather than wrong.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// CPU time (user + system) of process `pid` so far, with its parent's pid; `None` when
/// `/proc` does not have it.
fn process_cpu(proc_dir: &Path, pid: u32) -> Option<(u32, Duration)> {
    let stat = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&stat)
}

/// The parent pid and the CPU time of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself hold spaces and parentheses, so fields are counted from
/// its last `)`.
fn parse_stat(stat: &str) -> Option<(u32, Duration)> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(3) ppid(4) … utime(14) stime(15), so ppid is [1], utime [11].
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in clock ticks of USER_HZ, which is 100 on every supported
    // architecture (the kernel converts its internal HZ for user space).
    Some((ppid, Duration::from_millis((utime + stime) * 10)))
}

/// CPU time this process has used so far, if known.
pub fn own_cpu() -> Option<Duration> {
    process_cpu(Path::new("/proc"), std::process::id()).map(|(_, cpu)| cpu)
}

/// The PostgreSQL server on this machine that runs backend `backend_pid` (from
/// `pg_backend_pid()`), found as the backend's parent (the postmaster); `None` when the server
/// is elsewhere or `/proc` does not show it.
pub fn postgres_server_of(backend_pid: u32) -> Option<PostgresServer> {
    let (postmaster, _) = process_cpu(Path::new("/proc"), backend_pid)?;
    Some(PostgresServer { postmaster })
}

/// A local PostgreSQL server whose processes' CPU can be read.
#[derive(Debug, Clone, Copy)]
pub struct PostgresServer {
    postmaster: u32,
}

impl PostgresServer {
    /// CPU time used so far by each of the server's processes running now (backends, WAL
    /// writer, checkpointer, autovacuum, …), by pid.
    pub fn sample(&self) -> CpuSample {
        let proc_dir = Path::new("/proc");
        let by_pid = std::fs::read_dir(proc_dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| Some((pid, process_cpu(proc_dir, pid)?)))
            .filter(|(_, (ppid, _))| *ppid == self.postmaster)
            .map(|(pid, (_, cpu))| (pid, cpu))
            .collect();
        CpuSample { by_pid }
    }
}

/// The CPU time of a server's processes at one moment.
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    by_pid: HashMap<u32, Duration>,
}

impl CpuSample {
    /// CPU used between `earlier` and this sample by the processes running now. A process
    /// that exited in between is left out (its last moments are lost, not counted twice);
    /// one that started in between counts from its start.
    pub fn since(&self, earlier: &CpuSample) -> Duration {
        self.by_pid
            .iter()
            .map(|(pid, cpu)| {
                cpu.saturating_sub(earlier.by_pid.get(pid).copied().unwrap_or_default())
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 75 0 0 20 0";
        assert_eq!(parse_stat(line), Some((17, Duration::from_millis(3250))));
        assert_eq!(parse_stat("4242 (truncated"), None);
        assert_eq!(parse_stat("4242 (x) S notapid"), None);
    }

    #[test]
    fn cpu_since_an_earlier_sample_ignores_processes_that_exited() {
        let ms = Duration::from_millis;
        let earlier = CpuSample {
            by_pid: HashMap::from([(1, ms(500)), (2, ms(9000)), (3, ms(40))]),
        };
        // 2 exited (a closed connection), 4 started.
        let now = CpuSample {
            by_pid: HashMap::from([(1, ms(700)), (3, ms(40)), (4, ms(30))]),
        };
        assert_eq!(now.since(&earlier), ms(230));
    }

    #[test]
    fn this_process_cpu_time_is_read() {
        if !Path::new("/proc/self/stat").exists() {
            return;
        }
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(own_cpu().is_some_and(|c| c > Duration::ZERO));
    }
}
