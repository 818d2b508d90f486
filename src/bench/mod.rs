//! The benchmarks behind `setpoint bench …`: they print figures, and nothing in the test suite
//! asserts on speed. A room of their own, above the layers they measure: they start throw-away
//! PostgreSQL clusters (`dev`), the API (`api`) and workers (`worker`), so nothing below
//! imports them.
//!
//! - [`queue`]: queue throughput and pickup latency (`setpoint bench queue`).
//! - [`api`]: Create calls per second next to PostgreSQL's commit rate (`setpoint bench api`).
//! - `chaos`: the chaos soak (`setpoint bench chaos`, and `tests/chaos.rs` in short): engines
//!   killed and paused, peers stopped, PostgreSQL restarted, then nothing lost and nothing
//!   duplicated.

pub mod api;
#[cfg(all(
    feature = "ec2",
    feature = "kubernetes",
    feature = "email",
    feature = "dns"
))]
pub mod chaos;
pub mod queue;
pub mod scale;

pub use queue::{DrainFigures, QueueBenchOptions, QueueBenchReport, run_queue_bench};
