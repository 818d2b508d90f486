//! # custom-engine: setpoint with a plugin of its own
//!
//! A platform team's engine, built outside setpoint's workspace: setpoint's engine as a library
//! ([`setpoint::engine::EngineBuilder`]), the built-in plugins, and the webhook notifier plugin
//! of this crate ([`WebhookPlugin`]). `src/main.rs` is the binary; `docs/plugins.md` in
//! setpoint's repository walks through this crate.
//!
//! The webhook plugin:
//! - reads `[plugins.webhook]` (`url`, optional `timeout` and `retention`; an unknown key is
//!   refused by name) and the signing secret from `SETPOINT_WEBHOOK_SECRET`
//!   ([`config`]);
//! - runs units of work kind `webhook.notify` ([`notify::Notify`]): a signed JSON POST whose
//!   `Idempotency-Key` is derived from the unit's token, so every attempt of a unit carries the
//!   same key, and which is not sent again once the endpoint accepted it;
//! - keeps each answered POST in its own table, `webhook_deliveries`, created by its own
//!   migration ([`deliveries`]);
//! - tells `/readyz` whether the endpoint's host is reachable ([`health`]);
//! - serves `webhook.v1.DeliveryService` on the engine's gRPC API ([`service`]).

pub mod config;
pub mod deliveries;
pub mod health;
pub mod notify;
pub mod plugin;
pub mod service;
pub mod signing;

pub use plugin::WebhookPlugin;

/// The plugin's gRPC messages, server and client (`proto/webhook/v1`).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("webhook.v1");

    /// The encoded file descriptor set of `proto/webhook/v1` (reflection, the API's gate).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/webhook_descriptor.bin"));
}
