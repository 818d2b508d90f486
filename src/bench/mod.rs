//! The benchmarks behind `setpoint bench …`: they print figures, and nothing in the test suite
//! asserts on speed. A room of their own, above the layers they measure: they start throw-away
//! PostgreSQL clusters (`dev`), the API (`api`) and workers (`worker`), so nothing below
//! imports them.

pub mod api;
pub mod queue;
pub mod scale;

pub use queue::{DrainFigures, QueueBenchOptions, QueueBenchReport, run_queue_bench};
