//! Named crash points for crash tests: a way to stop a process at an exact step of a unit.
//!
//! `SETPOINT_FAILPOINTS` holds a comma-separated list of names. When code reaches
//! [`hit`]`(name)` with a listed name, it prints `setpoint failpoint reached: NAME` on standard
//! error and then blocks the calling thread forever, so a test can SIGKILL the process at exactly
//! that point. Unset (the default, and always in production), [`hit`] costs one atomic load.

use std::sync::OnceLock;

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("SETPOINT_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The marker line printed on standard error when failpoint `name` is reached.
pub fn marker(name: &str) -> String {
    format!("setpoint failpoint reached: {name}")
}

/// Whether any failpoint is armed (so that a caller builds a name only when it may matter).
pub fn any_armed() -> bool {
    !armed().is_empty()
}

/// Stops the process here, for good, if `name` is listed in `SETPOINT_FAILPOINTS`.
pub fn hit(name: &str) {
    if armed().iter().any(|n| n == name) {
        eprintln!("{}", marker(name));
        loop {
            std::thread::park();
        }
    }
}
