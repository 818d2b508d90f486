//! The fault schedule: planned from the seed before the soak starts (so a seed replays it),
//! then executed against the world in time order.
//!
//! Every fault has a start and an end: an engine killed is started again 0.5–3 s later; an
//! engine paused is continued after 1.5–4 leases (so another engine takes its units over
//! while it sleeps, and it wakes up holding attempts it lost); PostgreSQL is down for 1–4 s;
//! the SMTP server and the EC2 endpoint are stopped for the configured outage length. At any
//! moment at least one engine runs, so that the API answers somewhere.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use super::ChaosConfig;
use super::world::World;

/// What the executor does at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// SIGKILL an engine.
    Kill(usize),
    /// Start a killed engine again.
    Start(usize),
    /// SIGSTOP an engine.
    Stop(usize),
    /// SIGCONT it.
    Cont(usize),
    /// Stop PostgreSQL.
    PgStop,
    /// Start it again.
    PgStart,
    /// SIGSTOP aiosmtpd.
    SmtpStop,
    /// SIGCONT it.
    SmtpCont,
    /// SIGSTOP moto.
    Ec2Stop,
    /// SIGCONT it.
    Ec2Cont,
}

/// The planned faults: (offset from the start, action), in time order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The events.
    pub events: Vec<(Duration, Action)>,
}

/// The faults a soak did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultCounts {
    /// SIGKILLs of engines.
    pub kills: usize,
    /// SIGSTOPs of engines (each longer than the lease).
    pub pauses: usize,
    /// The longest pause, in seconds.
    pub longest_pause_secs: f64,
    /// PostgreSQL restarts.
    pub pg_restarts: usize,
    /// SMTP outages.
    pub smtp_outages: usize,
    /// Seconds the SMTP server was stopped, in all.
    pub smtp_outage_secs: f64,
    /// EC2 outages.
    pub ec2_outages: usize,
    /// Seconds moto was stopped, in all.
    pub ec2_outage_secs: f64,
    /// Engines that exited on their own (a start while PostgreSQL was down) and were started
    /// again.
    pub failed_starts: usize,
}

/// An engine's planned unavailability.
#[derive(Debug, Clone, Copy)]
struct Down {
    engine: usize,
    from: Duration,
    to: Duration,
}

fn secs(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    })
}

/// Plans the faults of `config` from its seed.
pub fn plan(config: &ChaosConfig) -> Plan {
    // A stream of its own: the workload draws from another, so changing one never moves the
    // other.
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x6661_756c_7473);
    let total = config.duration.as_secs_f64();
    // Faults start after the first few seconds (instances exist by then) and end before the
    // phase does.
    let (start, end) = (total * 0.05, total * 0.95);
    let mut events = Vec::new();
    let mut downs: Vec<Down> = Vec::new();
    let lease = config.lease.as_secs_f64();

    // Engine faults: each on an engine that is not down then, leaving one engine up.
    let mut engine_fault = |rng: &mut StdRng, kill: bool, events: &mut Vec<(Duration, Action)>| {
        for _ in 0..50 {
            let length = if kill {
                secs(rng, 0.5, 3.0)
            } else {
                secs(rng, 1.5 * lease, 4.0 * lease)
            };
            let latest = end - length.as_secs_f64();
            if latest <= start {
                return false;
            }
            let from = secs(rng, start, latest);
            let to = from + length;
            let engine = rng.random_range(0..config.engines);
            let overlapping = |d: &&Down| d.from < to + Duration::from_secs(1) && from < d.to;
            let busy: Vec<usize> = downs.iter().filter(overlapping).map(|d| d.engine).collect();
            let mut engines_down = busy.clone();
            engines_down.sort_unstable();
            engines_down.dedup();
            if busy.contains(&engine) || engines_down.len() + 1 >= config.engines {
                continue;
            }
            downs.push(Down { engine, from, to });
            if kill {
                events.push((from, Action::Kill(engine)));
                events.push((to, Action::Start(engine)));
            } else {
                events.push((from, Action::Stop(engine)));
                events.push((to, Action::Cont(engine)));
            }
            return true;
        }
        false
    };
    for _ in 0..config.kills {
        engine_fault(&mut rng, true, &mut events);
    }
    for _ in 0..config.pauses {
        engine_fault(&mut rng, false, &mut events);
    }

    // Peer outages: each peer's outages in their own slices of the phase, so they never
    // overlap one another.
    let outages = |rng: &mut StdRng, n: usize, stop: Action, cont: Action, lo: f64, hi: f64| {
        if n == 0 {
            return Vec::new();
        }
        let slice = (end - start) / n as f64;
        let mut out = Vec::new();
        for k in 0..n {
            let length = secs(rng, lo, hi.min(slice * 0.9).max(lo)).as_secs_f64();
            let slice_start = start + slice * k as f64;
            let latest = (slice_start + slice - length).max(slice_start);
            let from = secs(rng, slice_start, latest);
            out.push((from, stop));
            out.push((from + Duration::from_secs_f64(length), cont));
        }
        out
    };
    let (lo, hi) = (config.outage.0.as_secs_f64(), config.outage.1.as_secs_f64());
    events.extend(outages(
        &mut rng,
        config.smtp_outages,
        Action::SmtpStop,
        Action::SmtpCont,
        lo,
        hi,
    ));
    events.extend(outages(
        &mut rng,
        config.ec2_outages,
        Action::Ec2Stop,
        Action::Ec2Cont,
        lo,
        hi,
    ));
    events.extend(outages(
        &mut rng,
        config.pg_restarts,
        Action::PgStop,
        Action::PgStart,
        1.0,
        4.0,
    ));
    events.sort_by_key(|a| a.0);
    Plan { events }
}

/// Executes `plan` from `start`, supervising the engines meanwhile (one that exited on its own
/// is started again); returns what was done.
pub async fn execute(plan: &Plan, world: &mut World, start: Instant, verbose: bool) -> FaultCounts {
    let mut counts = FaultCounts::default();
    let mut since = std::collections::HashMap::new();
    let say = |m: String| {
        if verbose {
            eprintln!("chaos: {m}");
        }
    };
    for (at, action) in &plan.events {
        // Supervise while waiting for the next event.
        loop {
            let now = Instant::now();
            if now >= start + *at {
                break;
            }
            let nap = (start + *at - now).min(Duration::from_millis(500));
            tokio::time::sleep(nap).await;
            let restarted = world.supervise();
            if restarted > 0 {
                say(format!(
                    "{restarted} engine(s) had exited and were started again"
                ));
            }
        }
        let t = format!("{:>6.1}s", at.as_secs_f64());
        match *action {
            Action::Kill(i) => {
                world.kill_engine(i);
                counts.kills += 1;
                say(format!("{t} SIGKILL engine {i}"));
            }
            Action::Start(i) => {
                world.start_engine(i);
                say(format!("{t} engine {i} started again"));
            }
            Action::Stop(i) => {
                world.pause_engine(i, true);
                since.insert(*action, *at);
                counts.pauses += 1;
                say(format!("{t} SIGSTOP engine {i}"));
            }
            Action::Cont(i) => {
                world.pause_engine(i, false);
                if let Some(from) = since.remove(&Action::Stop(i)) {
                    counts.longest_pause_secs = counts
                        .longest_pause_secs
                        .max(at.saturating_sub(from).as_secs_f64());
                }
                say(format!("{t} SIGCONT engine {i}"));
            }
            Action::PgStop => {
                match world.stop_postgres().await {
                    Ok(()) => counts.pg_restarts += 1,
                    Err(e) => say(format!("{t} stopping PostgreSQL failed: {e}")),
                }
                say(format!("{t} PostgreSQL stopped"));
            }
            Action::PgStart => {
                // Started again whatever it takes: the rest of the soak needs it.
                for attempt in 0.. {
                    match world.start_postgres().await {
                        Ok(()) => break,
                        Err(e) if attempt < 5 => {
                            say(format!("{t} starting PostgreSQL failed ({e}); again"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => {
                            say(format!("{t} PostgreSQL does not start: {e}"));
                            break;
                        }
                    }
                }
                say(format!("{t} PostgreSQL started"));
            }
            Action::SmtpStop => {
                world.pause_smtp(true);
                since.insert(*action, *at);
                counts.smtp_outages += 1;
                say(format!("{t} SMTP server stopped"));
            }
            Action::SmtpCont => {
                world.pause_smtp(false);
                if let Some(from) = since.remove(&Action::SmtpStop) {
                    counts.smtp_outage_secs += at.saturating_sub(from).as_secs_f64();
                }
                say(format!("{t} SMTP server continued"));
            }
            Action::Ec2Stop => {
                world.pause_moto(true);
                since.insert(*action, *at);
                counts.ec2_outages += 1;
                say(format!("{t} EC2 endpoint (moto) stopped"));
            }
            Action::Ec2Cont => {
                world.pause_moto(false);
                if let Some(from) = since.remove(&Action::Ec2Stop) {
                    counts.ec2_outage_secs += at.saturating_sub(from).as_secs_f64();
                }
                say(format!("{t} EC2 endpoint (moto) continued"));
            }
        }
    }
    counts.failed_starts = world.failed_starts;
    counts
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(seed: u64) -> ChaosConfig {
        let mut c = ChaosConfig::short(seed, PathBuf::new(), PathBuf::new());
        c.duration = Duration::from_secs(600);
        c.kills = 30;
        c.pauses = 10;
        c.smtp_outages = 3;
        c.ec2_outages = 3;
        c.outage = (Duration::from_secs(10), Duration::from_secs(30));
        c
    }

    #[test]
    fn a_seed_plans_the_same_faults_and_every_fault_ends() {
        let a = plan(&config(7));
        let b = plan(&config(7));
        assert_eq!(a.events, b.events, "the same seed plans the same faults");
        assert_ne!(a.events, plan(&config(8)).events);
        let count = |f: &dyn Fn(&Action) -> bool| a.events.iter().filter(|(_, e)| f(e)).count();
        assert_eq!(count(&|e| matches!(e, Action::Kill(_))), 30);
        assert_eq!(count(&|e| matches!(e, Action::Start(_))), 30);
        assert_eq!(count(&|e| matches!(e, Action::Stop(_))), 10);
        assert_eq!(count(&|e| matches!(e, Action::Cont(_))), 10);
        assert_eq!(count(&|e| *e == Action::PgStop), 2);
        assert_eq!(count(&|e| *e == Action::SmtpStop), 3);
        assert_eq!(count(&|e| *e == Action::Ec2Stop), 3);
        assert!(
            a.events
                .iter()
                .all(|(at, _)| *at <= Duration::from_secs(600))
        );
        // Never every engine down at once, and outages of one peer never overlap.
        let mut down = [false; 3];
        let (mut smtp, mut ec2) = (false, false);
        for (_, e) in &a.events {
            match *e {
                Action::Kill(i) | Action::Stop(i) => {
                    assert!(!down[i], "engine {i} is already down");
                    down[i] = true;
                    assert!(down.iter().any(|d| !d), "every engine is down");
                }
                Action::Start(i) | Action::Cont(i) => down[i] = false,
                Action::SmtpStop => {
                    assert!(!smtp);
                    smtp = true;
                }
                Action::SmtpCont => smtp = false,
                Action::Ec2Stop => {
                    assert!(!ec2);
                    ec2 = true;
                }
                Action::Ec2Cont => ec2 = false,
                Action::PgStop | Action::PgStart => {}
            }
        }
        // Pauses last longer than the lease.
        let lease = config(7).lease;
        let mut stopped = std::collections::HashMap::new();
        for (at, e) in &a.events {
            match *e {
                Action::Stop(i) => {
                    stopped.insert(i, *at);
                }
                Action::Cont(i) => {
                    let from = stopped.remove(&i).expect("stopped first");
                    assert!(*at - from > lease, "a pause outlasts the lease");
                }
                _ => {}
            }
        }
    }
}
