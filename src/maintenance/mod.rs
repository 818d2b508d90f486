//! Maintenance services: background jobs that keep the database in shape while the engine
//! runs. Each service is one file with the same shape (after River's maintenance services): a
//! `Config` with `validate`, `new`, a `run(shutdown)` loop that an engine spawns, and a
//! `run_once()` that does one round and that tests call directly. Any number of engines may
//! run a service against one database; each says how it shares the work.
//!
//! - [`retention`]: prunes what grows with traffic (finished units' history, request ids,
//!   journal rows, tombstones), one engine at a time.

pub mod retention;
