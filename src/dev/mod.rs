//! Local stand-ins for the real peers, so setpoint runs on one machine with no cloud account.

pub mod postgres;
pub mod stack;
pub mod testdb;
