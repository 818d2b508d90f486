//! Building the engine from its configuration: the adapters (EC2, Kubernetes, SMTP) and the KVX
//! workflows over them. Shared by `setpoint serve` (configuration from a file and the
//! environment) and `setpoint dev` (local peers it started itself), so both run the same code.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::Credentials;
use setpoint_adapter::{Cluster, Compute, Mailer};
use setpoint_ec2::{Ec2Compute, Ec2Config, Ec2Regions};
use setpoint_email::{SmtpConfig, SmtpMailer};
use setpoint_kubernetes::{KubernetesCluster, KubernetesConfig};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::ApiConfig;
use crate::worker::Registry;
use crate::worker::registry::DuplicateKind;
use crate::workflows::{self, WorkflowConfig, Workflows};

/// Why the engine could not be built. Never contains a password.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Some adapter sections are configured and others are not.
    #[error(
        "incomplete adapter configuration: [{present}] given but [{missing}] missing. The KVX \
         workflows need all of [ec2], [kubernetes] and [smtp] (in the configuration file, or \
         through SETPOINT_AWS_REGION / SETPOINT_KUBERNETES_URL / SETPOINT_SMTP_URL with \
         SETPOINT_EMAIL_FROM); configure none of them to run only the setpoint.noop kind"
    )]
    Incomplete {
        /// The sections that are configured, comma-separated.
        present: String,
        /// The sections that are missing, comma-separated.
        missing: String,
    },
    /// The EC2 adapter could not be built.
    #[error("EC2 adapter: {0}")]
    Ec2(String),
    /// The Kubernetes adapter could not be built.
    #[error("Kubernetes adapter: {0}")]
    Kubernetes(String),
    /// The SMTP adapter could not be built.
    #[error("SMTP adapter: {0}")]
    Smtp(String),
    /// A workflow kind was already registered.
    #[error(transparent)]
    Duplicate(#[from] DuplicateKind),
}

/// The configuration of all three adapters the KVX workflows need.
#[derive(Debug, Clone)]
pub struct AdapterConfigs {
    /// The `[ec2]` section.
    pub ec2: Ec2Config,
    /// The `[kubernetes]` section.
    pub kubernetes: KubernetesConfig,
    /// The `[smtp]` section.
    pub smtp: SmtpConfig,
}

impl AdapterConfigs {
    /// All three sections, `None` when none is given.
    ///
    /// # Errors
    /// [`EngineError::Incomplete`] naming the missing sections when only some are given;
    /// [`EngineError::Ec2`] when `[ec2]` configures several regions (the workflows hold one
    /// compute adapter until they route work by region).
    pub fn select(
        ec2: Option<Ec2Regions>,
        kubernetes: Option<KubernetesConfig>,
        smtp: Option<SmtpConfig>,
    ) -> Result<Option<Self>, EngineError> {
        let ec2 = ec2.map(one_region).transpose()?;
        match (ec2, kubernetes, smtp) {
            (Some(ec2), Some(kubernetes), Some(smtp)) => Ok(Some(Self {
                ec2,
                kubernetes,
                smtp,
            })),
            (None, None, None) => Ok(None),
            (ec2, kubernetes, smtp) => {
                let sections = [
                    ("ec2", ec2.is_some()),
                    ("kubernetes", kubernetes.is_some()),
                    ("smtp", smtp.is_some()),
                ];
                let names = |want: bool| {
                    sections
                        .iter()
                        .filter(|(_, given)| *given == want)
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join("], [")
                };
                Err(EngineError::Incomplete {
                    present: names(true),
                    missing: names(false),
                })
            }
        }
    }
}

/// The one region of `regions`; an error naming them when there are several.
fn one_region(regions: Ec2Regions) -> Result<Ec2Config, EngineError> {
    if regions.regions().len() == 1 {
        return Ok(regions.into_configs().remove(0));
    }
    Err(EngineError::Ec2(format!(
        "[ec2] configures {} regions ({}), and this engine serves one region: its workflows \
         do not route work by region yet. Configure one region",
        regions.regions().len(),
        regions.names().join(", ")
    )))
}

/// The adapters the workflows call.
#[derive(Clone)]
pub struct Adapters {
    /// EC2.
    pub compute: Arc<dyn Compute>,
    /// Kubernetes.
    pub cluster: Arc<dyn Cluster>,
    /// E-mail.
    pub mailer: Arc<dyn Mailer>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapters").finish_non_exhaustive()
    }
}

impl Adapters {
    /// Connects the adapters. EC2 credentials come from the standard AWS chains unless
    /// `ec2_credentials` is given (static ones, for moto).
    ///
    /// # Errors
    /// When an adapter's configuration is invalid or its client cannot be built.
    pub async fn build(
        configs: AdapterConfigs,
        ec2_credentials: Option<Credentials>,
    ) -> Result<Self, EngineError> {
        let ec2 = |e: &dyn std::fmt::Display| EngineError::Ec2(e.to_string());
        let compute = match ec2_credentials {
            Some(creds) => {
                let client = configs
                    .ec2
                    .client_with_credentials(creds)
                    .await
                    .map_err(|e| ec2(&e))?;
                Ec2Compute::from_client(client, configs.ec2)
            }
            None => Ec2Compute::connect(configs.ec2)
                .await
                .map_err(|e| ec2(&e))?,
        };
        let cluster = KubernetesCluster::connect(&configs.kubernetes)
            .await
            .map_err(|e| EngineError::Kubernetes(e.to_string()))?;
        let mailer = SmtpMailer::new(configs.smtp).map_err(|e| EngineError::Smtp(e.to_string()))?;
        Ok(Self {
            compute: Arc::new(compute),
            cluster: Arc::new(cluster),
            mailer: Arc::new(mailer),
        })
    }

    /// Registers every KVX workflow kind over these adapters.
    ///
    /// # Errors
    /// When one of the kinds is already registered.
    pub fn register_workflows(
        self,
        registry: &mut Registry,
        pool: PgPool,
        config: WorkflowConfig,
    ) -> Result<(), EngineError> {
        Workflows::new(self.compute, self.cluster, self.mailer, pool, config).register(registry)?;
        Ok(())
    }
}

/// `api` with its create, update and delete kinds set to the first steps of the workflows.
pub fn with_workflow_kinds(api: ApiConfig) -> ApiConfig {
    ApiConfig {
        create_kind: workflows::CREATE_KIND.into(),
        update_kind: workflows::UPDATE_KIND.into(),
        delete_kind: workflows::DELETE_KIND.into(),
        ..api
    }
}

/// Starts the drift resync (an observe unit per ready instance every `interval`) until
/// `shutdown`; `None` when no interval is set.
pub fn spawn_resync(
    pool: &PgPool,
    interval: Option<Duration>,
    shutdown: &CancellationToken,
) -> Option<JoinHandle<()>> {
    interval.map(|every| {
        tokio::spawn(workflows::drift::Resync::new(pool.clone(), every, 500).run(shutdown.clone()))
    })
}
