//! The webhook plugin: what the engine builder calls, in order — `configure` (its table and
//! the environment), `provide` (its HTTP client), `register` (handler, health check, gRPC
//! service), then `migrations` (applied before any unit runs).

use std::sync::Arc;

use setpoint::plugin::{ConfigContext, Plugin, PluginError, PluginMigration, Registrar, Services};
use setpoint_adapter::{BoxFuture, typed};
use sqlx::PgPool;

use crate::config::WebhookSettings;
use crate::deliveries;
use crate::health::EndpointReachable;
use crate::notify::Notify;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::delivery_service_server::DeliveryServiceServer;
use crate::service::Deliveries;

/// The plugin's name: the key of its `[plugins.webhook]` table.
pub const NAME: &str = "webhook";

/// The webhook notifier plugin. Without a `[plugins.webhook]` table it is not configured and
/// registers nothing (its migration still runs, so the table is there when it is configured).
pub struct WebhookPlugin {
    pool: PgPool,
    settings: Option<WebhookSettings>,
    client: Option<reqwest::Client>,
}

impl WebhookPlugin {
    /// The plugin, keeping its records in `pool` (the engine's database). The engine hands
    /// plugins no pool of its own, so the binary that builds the engine passes it.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            settings: None,
            client: None,
        }
    }
}

impl Plugin for WebhookPlugin {
    fn name(&self) -> &str {
        NAME
    }

    fn configure(&mut self, cx: &ConfigContext<'_>) -> Result<(), PluginError> {
        self.settings = WebhookSettings::read(cx)?;
        if let Some(s) = &self.settings {
            // The URL holds no credentials (refused when read); the secret is not logged.
            tracing::info!(url = %s.url, timeout = ?s.timeout, "webhook plugin configured");
        }
        Ok(())
    }

    fn provide<'a>(
        &'a mut self,
        _services: &'a mut Services,
    ) -> BoxFuture<'a, Result<(), PluginError>> {
        Box::pin(async move {
            let Some(settings) = &self.settings else {
                return Ok(());
            };
            let client = reqwest::Client::builder()
                .timeout(settings.timeout)
                .connect_timeout(settings.timeout.min(std::time::Duration::from_secs(5)))
                // A redirect is answered as an error (configure the final URL): following it
                // would re-send a signed body to an address nobody configured.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("setpoint-webhook/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| PluginError::Start {
                    plugin: NAME.into(),
                    message: format!("cannot build the HTTP client: {e}"),
                })?;
            self.client = Some(client);
            Ok(())
        })
    }

    fn register(&self, _services: &Services, r: &mut Registrar) -> Result<(), PluginError> {
        let (Some(settings), Some(client)) = (&self.settings, &self.client) else {
            return Ok(());
        };
        r.handler(typed(Notify::new(
            client.clone(),
            settings,
            self.pool.clone(),
        )))?;
        r.health_check(Arc::new(EndpointReachable::new(&settings.url)));
        r.grpc_service(
            DeliveryServiceServer::new(Deliveries::new(self.pool.clone())),
            FILE_DESCRIPTOR_SET,
        )?;
        Ok(())
    }

    fn migrations(&self) -> Vec<PluginMigration> {
        deliveries::migrations()
    }
}
