//! Local stand-ins for the real peers, so setpoint runs on one machine with no cloud account,
//! and what the benchmarks read of the machine.

pub mod cpu;
pub mod postgres;
pub mod stack;
pub mod testdb;
