//! [`Ec2Compute`]: the SDK's [`Compute`] trait on Amazon EC2 (or moto).
//!
//! Every instance it launches carries four tags, set atomically by `RunInstances`:
//! [`TAG_TOKEN`] (the launching unit's token), [`TAG_RESOURCE`] (the setpoint resource id),
//! [`TAG_TENANT`] and [`TAG_MANAGED`]`=true`, plus `Name`. `ensure` looks for the token tag
//! before it launches anything and passes the token as `ClientToken` too: the tag lookup works
//! forever and on moto, the client token covers EC2's eventually consistent `DescribeInstances`
//! right after a launch.
//!
//! moto does not honour `ClientToken`, so there two attempts of one unit that race (a stale
//! one past its lease and the live one) can both launch. Every lookup by token then picks the
//! same instance, the oldest (launch time, then id); `ensure` and `resize` terminate the others
//! once their fence holds, and `ensure` looks again right after its own launch, adopting an
//! older instance if another attempt launched one meanwhile. `describe` changes nothing: it
//! only logs the extras, which the orphan sweep reports as `extra` machines.
//!
//! `resize` finds the instance by the same token tag and walks it to the wanted instance type
//! one observed step at a time: `StopInstances`, wait for `stopped`, `ModifyInstanceAttribute`
//! (`InstanceType`), `StartInstances`, wait for `running`. Each step is chosen from the state it
//! observes, so a retry after a crash anywhere in between picks up where the instance is.
//! Before any of that it grows the data volume (`ModifyVolume`) when the request wants it
//! larger: observed first, so a volume at the size (or being given it) costs no call.
//!
//! A launch that asks for a data volume adds one EBS volume to `RunInstances`' block device
//! mappings (device `data_volume.device_name`, `DeleteOnTermination` and `Encrypted` set
//! explicitly), and the launch tags every volume it makes like the instance. Observations find
//! the data volume again by its device name in the instance's block device mappings, then read
//! its size (`DescribeVolumes`) and latest modification (`DescribeVolumesModifications`).
//!
//! `list_managed_machines` pages through the live instances tagged [`TAG_MANAGED`]`=true`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::{
    AttributeValue, BlockDeviceMapping, EbsBlockDevice, Filter, Instance, InstanceStateChange,
    InstanceType, ResourceType, Tag, TagSpecification, VolumeModification as Ec2Modification,
    VolumeType,
};
use setpoint_adapter::failpoint;
use setpoint_adapter::{
    AdapterError, BoxFuture, Budget, BudgetKey, Budgets, CODE_MACHINE_NOT_FOUND,
    CODE_VOLUME_SHRINK, Compute, DataVolume, ErrorClass, Fence, IdempotencyToken,
    InstanceObservation, InstanceRequest, InstanceState, Limit, ListMachinesRequest, MachinePage,
    ManagedMachine, ResizeRequest, TerminateOutcome, TerminateRequest, Unlimited,
    VolumeModification, VolumeModificationState,
};
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::classify::{classify, volume_change_refused};
use crate::config::{ConfigError, Ec2Config};
use setpoint_adapter::aws::LeaveThrottlesToBudget;

/// Tag holding the token of the unit that launched the instance.
pub const TAG_TOKEN: &str = "setpoint:token";
/// Tag holding the setpoint resource id (the `instances` row) the instance belongs to.
pub const TAG_RESOURCE: &str = "setpoint:instance-id";
/// Tag holding the tenant owning the resource.
pub const TAG_TENANT: &str = "setpoint:tenant";
/// Tag marking instances setpoint manages (value `true`); terminate touches nothing else.
pub const TAG_MANAGED: &str = "setpoint:managed";

/// Failpoint reached right before `RunInstances` is sent.
pub const FAILPOINT_BEFORE_RUN: &str = "ec2.before-run-instances";
/// Failpoint reached right after `RunInstances` returned successfully.
pub const FAILPOINT_AFTER_RUN: &str = "ec2.after-run-instances";

/// States in which an instance still exists (what `ensure` adopts).
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

/// EC2 takes at most 200 values per filter: a batched describe asks for this many at a time.
const VALUES_PER_FILTER: usize = 200;

/// The most reservations `DescribeInstances` answers per page when asked by filter (EC2's
/// upper bound of `MaxResults`).
const MAX_DESCRIBE_PAGE: i32 = 1000;

/// Keeps this much of the deadline free when polling, for the last call to return.
const POLL_MARGIN: Duration = Duration::from_millis(500);

/// Machines per page of `list_managed_machines` when the request names no page size.
pub const DEFAULT_LIST_PAGE_SIZE: u32 = 500;

/// EC2's bounds of `DescribeInstances`' `MaxResults`; a page size outside them is clamped.
const LIST_PAGE_BOUNDS: (u32, u32) = (5, 1000);

/// The error code of a resize that wants a data volume the instance does not have.
pub use setpoint_adapter::CODE_NO_DATA_VOLUME;

/// The EC2 implementation of [`Compute`]. Cheap to clone (the client is shared).
#[derive(Debug, Clone)]
pub struct Ec2Compute {
    client: Client,
    config: Arc<Ec2Config>,
    budgets: Ec2Budgets,
}

/// The request budgets of one region's calls, one per class of EC2's request-rate buckets
/// (see [`crate::config::Ec2BudgetsConfig`]).
#[derive(Debug, Clone)]
pub struct Ec2Budgets {
    /// `RunInstances` (its own resource bucket).
    pub run_instances: Budget,
    /// Every other call that changes something (stop, start, modify, terminate).
    pub mutating: Budget,
    /// `Describe*` calls.
    pub describe: Budget,
}

impl Ec2Budgets {
    /// The budgets of `config`'s region and account (or endpoint), drawn from `budgets`.
    pub fn new(budgets: Arc<dyn Budgets>, config: &Ec2Config) -> Self {
        let c = &config.budgets;
        let scope = c.scope_for(config.endpoint_url.as_deref());
        let budget = |class: &str, limit: Limit| {
            Budget::new(
                budgets.clone(),
                BudgetKey::new("ec2", scope.clone(), config.region.clone(), class),
                limit,
            )
        };
        Self {
            run_instances: budget("run_instances", c.run_instances),
            mutating: budget("mutating", c.mutating),
            describe: budget("describe", c.describe),
        }
    }
}

/// How to wait for `running`: pauses start at `initial` and double up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PollPolicy {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
}

impl Ec2Compute {
    /// Connects with the standard AWS credential chain.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration is invalid; nothing is sent to AWS yet.
    pub async fn connect(config: Ec2Config) -> Result<Self, ConfigError> {
        let client = config.client().await?;
        Ok(Self::from_client(client, config))
    }

    /// Uses an already built client (e.g. from
    /// [`Ec2Config::client_with_credentials`]) with `config`'s launch settings.
    pub fn from_client(client: Client, config: Ec2Config) -> Self {
        Self {
            budgets: Ec2Budgets::new(Arc::new(Unlimited), &config),
            client,
            config: Arc::new(config),
        }
    }

    /// Draws the calls' tokens from `budgets` (the engine's, shared by every engine), at the
    /// limits of `[ec2.budgets]`. Without it nothing is limited. With a shared budget
    /// ([`Budgets::shared`]) the SDK no longer resends a throttled call itself
    /// ([`LeaveThrottlesToBudget`]): the throttle goes to the budget at once; other failures
    /// are still resent up to `max_attempts`.
    pub fn with_budgets(mut self, budgets: Arc<dyn Budgets>) -> Self {
        if budgets.shared() {
            self.client = Client::from_conf(
                self.client
                    .config()
                    .to_builder()
                    .retry_classifier(LeaveThrottlesToBudget)
                    .build(),
            );
        }
        self.budgets = Ec2Budgets::new(budgets, &self.config);
        self
    }

    /// The budgets its calls draw from.
    pub fn budgets(&self) -> &Ec2Budgets {
        &self.budgets
    }

    /// The EC2 client, for tools and tests.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration this adapter launches with.
    pub fn config(&self) -> &Ec2Config {
        &self.config
    }

    fn poll_policy(&self) -> PollPolicy {
        PollPolicy {
            initial: Duration::from_millis(self.config.timeouts.poll_initial_ms),
            max: Duration::from_millis(self.config.timeouts.poll_max_ms),
        }
    }

    /// Every page of a describe call, each drawn from the describe budget: `call` asks for the
    /// page after a token, `next_token` reads the token of the page after.
    async fn pages<P, Fut>(
        &self,
        mut call: impl FnMut(Option<String>) -> Fut,
        next_token: impl Fn(&P) -> Option<&str>,
    ) -> Result<Vec<P>, AdapterError>
    where
        Fut: Future<Output = Result<P, AdapterError>>,
    {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self.budgets.describe.call(call(next.take())).await?;
            next = next_token(&page)
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            out.push(page);
            if next.is_none() {
                return Ok(out);
            }
        }
    }

    /// Every instance matching `filters` (all pages).
    async fn describe(
        &self,
        filters: Vec<Filter>,
        ids: Vec<String>,
    ) -> Result<Vec<Instance>, AdapterError> {
        let pages = self
            .pages(
                |next| {
                    let req = self
                        .client
                        .describe_instances()
                        .set_filters(Some(filters.clone()).filter(|f| !f.is_empty()))
                        .set_instance_ids(Some(ids.clone()).filter(|i| !i.is_empty()))
                        // The largest page EC2 allows, where it allows one (not beside
                        // instance ids). Without it moto answers 100 reservations a page, and
                        // a batch of 200 launch tokens took two calls.
                        .set_max_results(ids.is_empty().then_some(MAX_DESCRIBE_PAGE))
                        .set_next_token(next);
                    async move {
                        req.send()
                            .await
                            .map_err(|e| classify("DescribeInstances", &e))
                    }
                },
                |p| p.next_token(),
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| p.reservations())
            .flat_map(|r| r.instances().iter().cloned())
            .collect())
    }

    /// Live (not terminated, not shutting down) managed instances carrying `tag=value`,
    /// oldest first ([`launch_order`]).
    async fn live_tagged(&self, tag: &str, value: &str) -> Result<Vec<Instance>, AdapterError> {
        let mut found = self
            .describe(
                vec![
                    filter(&format!("tag:{tag}"), [value]),
                    filter(&format!("tag:{TAG_MANAGED}"), ["true"]),
                    filter("instance-state-name", LIVE_STATES),
                ],
                Vec::new(),
            )
            .await?;
        found.sort_by_key(launch_order);
        Ok(found)
    }

    /// The instance launched with `token`, if any is live, with its data volume. Read-only:
    /// extra instances carrying the token are reported, not terminated (see
    /// [`Ec2Compute::find_by_token`]).
    async fn observe_by_token(
        &self,
        token: &IdempotencyToken,
    ) -> Result<Option<InstanceObservation>, AdapterError> {
        match self.find_by_token(token, None).await? {
            Some(i) => match observation(&i, true) {
                Some(obs) => Ok(Some(self.with_data_volume(obs, Some(&i)).await?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// The live instance launched with `token`, as EC2 describes it: the oldest, if several
    /// carry the token (see [`Ec2Compute::keep_one`]). With a `fence` (ensure, resize) the
    /// others are terminated; without one (describe, which changes nothing) they are only
    /// reported.
    async fn find_by_token(
        &self,
        token: &IdempotencyToken,
        fence: Option<&Fence>,
    ) -> Result<Option<Instance>, AdapterError> {
        let found = self.live_tagged(TAG_TOKEN, token.as_str()).await?;
        self.keep_one(token, found, fence).await
    }

    /// One instance of `found` (the live instances carrying `token`): the oldest by launch
    /// time, ties broken by id ([`launch_order`]), so that every attempt of a unit, stale or
    /// live, picks the same one whatever order EC2 lists them in.
    ///
    /// More than one instance carries a token only where `ClientToken` is not honoured
    /// (moto) and two attempts launched at once: a stale attempt past its lease and the live
    /// one. With a `fence`, the others are terminated once the fence is checked (a stale
    /// attempt terminates nothing: its lease-lost error comes back instead); terminating an
    /// instance that is already going is success. Without one they are only logged, and the
    /// orphan sweep reports (and, when configured, terminates) them as `extra` machines.
    async fn keep_one(
        &self,
        token: &IdempotencyToken,
        mut found: Vec<Instance>,
        fence: Option<&Fence>,
    ) -> Result<Option<Instance>, AdapterError> {
        found.sort_by_key(launch_order);
        if found.len() <= 1 {
            return Ok(found.pop());
        }
        let kept = found.remove(0);
        let kept_id = kept.instance_id().unwrap_or_default();
        let extras: Vec<String> = found
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        let Some(fence) = fence else {
            warn!(
                %token,
                adopted = kept_id,
                extras = ?extras,
                "more than one live instance carries this token; adopting the oldest, the \
                 orphan sweep reports the others"
            );
            return Ok(Some(kept));
        };
        warn!(
            %token,
            adopted = kept_id,
            extras = ?extras,
            "more than one live instance carries this token (two attempts launched where \
             ClientToken is not honoured); adopting the oldest, terminating the others"
        );
        let outcome = self.terminate_ids_tolerant(extras, fence).await?;
        info!(
            %token,
            terminated = ?outcome.terminated,
            already_gone = ?outcome.already_gone,
            "extra instances carrying this token terminated"
        );
        Ok(Some(kept))
    }

    /// `obs` with the data volume `instance` has at the configured device, if any.
    async fn with_data_volume(
        &self,
        mut obs: InstanceObservation,
        instance: Option<&Instance>,
    ) -> Result<InstanceObservation, AdapterError> {
        let device = &self.config.data_volume.device_name;
        if let Some(volume_id) = instance.and_then(|i| data_volume_id(i, device)) {
            obs.data_volume = self.data_volume(&volume_id).await?;
        }
        Ok(obs)
    }

    /// The volume `volume_id` (size) and its latest modification; `None` if EC2 no longer
    /// knows it. Filters rather than ids: an unknown id is an empty answer, not an error, and
    /// `DescribeVolumesModifications` fails for a volume that was never modified when asked by
    /// id.
    async fn data_volume(&self, volume_id: &str) -> Result<Option<DataVolume>, AdapterError> {
        let volumes = self
            .budgets
            .describe
            .call(async {
                self.client
                    .describe_volumes()
                    .filters(filter("volume-id", [volume_id]))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeVolumes", &e))
            })
            .await?;
        let Some(volume) = volumes
            .volumes()
            .iter()
            .find(|v| v.volume_id() == Some(volume_id))
        else {
            return Ok(None);
        };
        let modifications = self
            .budgets
            .describe
            .call(async {
                self.client
                    .describe_volumes_modifications()
                    .filters(filter("volume-id", [volume_id]))
                    .send()
                    .await
                    .map_err(|e| classify("DescribeVolumesModifications", &e))
            })
            .await?;
        Ok(Some(DataVolume {
            volume_id: volume_id.to_owned(),
            size_gb: gib(volume.size()),
            modification: latest_modification(modifications.volumes_modifications()),
        }))
    }

    /// The instance `id` as EC2 reports it now; `None` if EC2 does not know it.
    async fn observe_by_id(&self, id: &str) -> Result<Option<Instance>, AdapterError> {
        match self.describe(Vec::new(), vec![id.to_owned()]).await {
            Ok(found) => Ok(found.into_iter().next()),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// For each token, what [`Self::observe_by_token`] answers for it alone, with one
    /// `DescribeInstances` per [`VALUES_PER_FILTER`] tokens (and per page) and one
    /// `DescribeVolumes` and `DescribeVolumesModifications` per as many data volumes, instead
    /// of up to three calls per token.
    async fn observe_by_tokens(
        &self,
        tokens: &[IdempotencyToken],
    ) -> Result<Vec<Option<InstanceObservation>>, AdapterError> {
        let mut by_token: HashMap<String, Vec<Instance>> = HashMap::new();
        for chunk in tokens.chunks(VALUES_PER_FILTER) {
            let found = self
                .describe(
                    vec![
                        filter_values(
                            &format!("tag:{TAG_TOKEN}"),
                            chunk.iter().map(|t| t.as_str().to_owned()).collect(),
                        ),
                        filter(&format!("tag:{TAG_MANAGED}"), ["true"]),
                        filter("instance-state-name", LIVE_STATES),
                    ],
                    Vec::new(),
                )
                .await?;
            for i in found {
                if let Some(t) = tag_value(&i, TAG_TOKEN) {
                    by_token.entry(t.to_owned()).or_default().push(i);
                }
            }
        }
        let device = &self.config.data_volume.device_name;
        let adopted: Vec<Option<Instance>> = tokens
            .iter()
            .map(|t| {
                // Not removed: a token may be asked for twice.
                let mut found = by_token.get(t.as_str()).cloned().unwrap_or_default();
                found.sort_by_key(launch_order);
                if found.len() > 1 {
                    warn!(token = %t, count = found.len(),
                        "more than one live instance carries this token; observing the oldest");
                }
                found.into_iter().next()
            })
            .collect();
        let volume_ids: Vec<String> = adopted
            .iter()
            .flatten()
            .filter_map(|i| data_volume_id(i, device))
            .collect();
        let volumes = self.data_volumes(&volume_ids).await?;
        Ok(adopted
            .iter()
            .map(|found| {
                let i = found.as_ref()?;
                let mut obs = observation(i, true)?;
                if let Some(id) = data_volume_id(i, device) {
                    obs.data_volume = volumes.get(&id).cloned();
                }
                Some(obs)
            })
            .collect())
    }

    /// The volumes of `ids` that EC2 knows, with their latest modification, by id.
    async fn data_volumes(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, DataVolume>, AdapterError> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(VALUES_PER_FILTER) {
            let volume_pages = self
                .pages(
                    |next| {
                        let req = self
                            .client
                            .describe_volumes()
                            .filters(filter_values("volume-id", chunk.to_vec()))
                            .set_next_token(next);
                        async move {
                            req.send()
                                .await
                                .map_err(|e| classify("DescribeVolumes", &e))
                        }
                    },
                    |p| p.next_token(),
                )
                .await?;
            let sizes = volume_pages
                .iter()
                .flat_map(|p| p.volumes())
                .filter_map(|v| Some((v.volume_id()?.to_owned(), gib(v.size()))));
            let modification_pages = self
                .pages(
                    |next| {
                        let req = self
                            .client
                            .describe_volumes_modifications()
                            .filters(filter_values("volume-id", chunk.to_vec()))
                            .set_next_token(next);
                        async move {
                            req.send()
                                .await
                                .map_err(|e| classify("DescribeVolumesModifications", &e))
                        }
                    },
                    |p| p.next_token(),
                )
                .await?;
            let mut modifications: HashMap<String, Vec<Ec2Modification>> = HashMap::new();
            for m in modification_pages
                .iter()
                .flat_map(|p| p.volumes_modifications())
            {
                if let Some(id) = m.volume_id() {
                    modifications
                        .entry(id.to_owned())
                        .or_default()
                        .push(m.clone());
                }
            }
            for (volume_id, size_gb) in sizes {
                let modification = modifications
                    .get(&volume_id)
                    .and_then(|m| latest_modification(m));
                out.insert(
                    volume_id.clone(),
                    DataVolume {
                        volume_id,
                        size_gb,
                        modification,
                    },
                );
            }
        }
        Ok(out)
    }

    /// Image, instance type and subnet for a launch, from the request, its plan and defaults.
    fn launch_params(
        &self,
        token: &IdempotencyToken,
        req: &InstanceRequest,
    ) -> Result<LaunchParams, AdapterError> {
        let plan = self.config.plans.get(&req.plan);
        if plan.is_none() {
            warn!(%token, plan = %req.plan, "plan not configured in [ec2.plans]; using defaults");
        }
        let image_id = req
            .image_id
            .clone()
            .or_else(|| plan.and_then(|p| p.image_id.clone()))
            .or_else(|| self.config.default_image_id.clone())
            .ok_or_else(|| {
                AdapterError::permanent(format!(
                    "no AMI configured for plan {:?}: set ec2.plans.\"{}\".image_id or \
                     ec2.default_image_id, then retry the unit",
                    req.plan, req.plan
                ))
                .with_code("ec2-no-image")
            })?;
        let instance_type = self.instance_type_for(&req.plan, req.instance_type.as_deref());
        let subnet_id = self
            .config
            .subnet_for(token.as_str(), req.subnet_id.as_deref());
        if req.data_volume_gb == Some(0) {
            return Err(AdapterError::permanent(
                "the data volume size is 0 GiB: ask for at least 1 GiB, or for no data volume",
            )
            .with_code("ec2-bad-volume-size"));
        }
        Ok(LaunchParams {
            image_id,
            instance_type,
            subnet_id,
            data_volume_gb: req.data_volume_gb,
        })
    }

    /// The instance type for `plan`: `override_type` if given, else the plan's, else the
    /// default. Launch and resize share it, so a resize gives the size a new launch would get.
    fn instance_type_for(&self, plan: &str, override_type: Option<&str>) -> String {
        override_type
            .map(str::to_owned)
            .or_else(|| {
                self.config
                    .plans
                    .get(plan)
                    .and_then(|p| p.instance_type.clone())
            })
            .unwrap_or_else(|| self.config.default_instance_type.clone())
    }

    async fn run_instance(
        &self,
        token: &IdempotencyToken,
        req: &InstanceRequest,
        launch: &LaunchParams,
        fence: &Fence,
    ) -> Result<(InstanceObservation, Instance), AdapterError> {
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("setpoint-{}", req.resource_id));
        let resource_id = req.resource_id.to_string();
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(tag(TAG_TOKEN, token.as_str()))
            .tags(tag(TAG_RESOURCE, &resource_id))
            .tags(tag(TAG_TENANT, &req.tenant))
            .tags(tag(TAG_MANAGED, "true"))
            .tags(tag("Name", &name))
            .build();
        // Every volume the launch makes (root and data) carries the same ownership tags, so
        // cost reports and an operator can tell whose it is.
        let volume_tags = TagSpecification::builder()
            .resource_type(ResourceType::Volume)
            .tags(tag(TAG_TOKEN, token.as_str()))
            .tags(tag(TAG_RESOURCE, &resource_id))
            .tags(tag(TAG_TENANT, &req.tenant))
            .tags(tag(TAG_MANAGED, "true"))
            .build();
        let data_volume = launch.data_volume_gb.map(|gb| self.data_volume_mapping(gb));
        let call = self
            .client
            .run_instances()
            .client_token(token.as_str())
            .image_id(&launch.image_id)
            .instance_type(InstanceType::from(launch.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .set_subnet_id(launch.subnet_id.clone())
            .set_security_group_ids(
                Some(self.config.security_group_ids.clone()).filter(|g| !g.is_empty()),
            )
            .set_block_device_mappings(data_volume.map(|m| vec![m]))
            .tag_specifications(tags)
            .tag_specifications(volume_tags);

        info!(
            image_id = %launch.image_id,
            instance_type = %launch.instance_type,
            subnet_id = launch.subnet_id.as_deref().unwrap_or("(default)"),
            data_volume_gb = launch.data_volume_gb,
            "launching instance (RunInstances)"
        );
        failpoint::hit(FAILPOINT_BEFORE_RUN);
        // The token first: the fence check must be the last thing before the launch.
        self.budgets.run_instances.take().await?;
        fence.check()?;
        let sent = call.send().await.map_err(|e| classify("RunInstances", &e));
        let out = self
            .budgets
            .run_instances
            .report(sent)
            .await
            .inspect_err(|e| warn!(error = %e, "RunInstances failed"))?;
        failpoint::hit(FAILPOINT_AFTER_RUN);

        let (obs, instance) = out
            .instances()
            .first()
            .and_then(|i| Some((observation(i, false)?, i.clone())))
            .ok_or_else(|| {
                AdapterError::transient("RunInstances succeeded but returned no instance")
            })?;
        if obs.state.is_gone() {
            return Err(gone_while_starting(&obs));
        }
        info!(instance_id = %obs.instance_id, state = %obs.state, "instance launched");
        Ok((obs, instance))
    }

    /// After a launch: looks again for every live instance carrying `token`, because where
    /// `ClientToken` is not honoured (moto) another attempt of the unit (a stale one, past its
    /// lease) may have launched one too between this attempt's lookup and its launch. Every
    /// attempt keeps the same one ([`Ec2Compute::keep_one`]: the oldest), so this attempt
    /// adopts the other instance when that one is older, and terminates the rest, its own
    /// launch included, after checking its fence. Where the lookup does not show the launch
    /// yet (EC2's eventual consistency) the launch counts as found.
    async fn settle_launch(
        &self,
        token: &IdempotencyToken,
        obs: InstanceObservation,
        instance: Instance,
        fence: &Fence,
    ) -> Result<(InstanceObservation, Instance), AdapterError> {
        let mut found = self.live_tagged(TAG_TOKEN, token.as_str()).await?;
        if !found
            .iter()
            .any(|i| i.instance_id() == Some(obs.instance_id.as_str()))
        {
            found.push(instance.clone());
        }
        if found.len() <= 1 {
            return Ok((obs, instance));
        }
        match self.keep_one(token, found, Some(fence)).await? {
            Some(kept) if kept.instance_id() != Some(obs.instance_id.as_str()) => {
                let adopted = observation(&kept, true).ok_or_else(|| {
                    AdapterError::transient("EC2 listed an instance without an id")
                })?;
                info!(
                    instance_id = %adopted.instance_id,
                    terminated = %obs.instance_id,
                    "another attempt launched first; adopting its instance"
                );
                Ok((adopted, kept))
            }
            _ => Ok((obs, instance)),
        }
    }

    /// The block device mapping of a `gb` GiB data volume. `DeleteOnTermination` and
    /// `Encrypted` are explicit: EC2 defaults the first to true but moto to false, and the
    /// second follows the account's "encryption by default" unless set.
    fn data_volume_mapping(&self, gb: u32) -> BlockDeviceMapping {
        let v = &self.config.data_volume;
        BlockDeviceMapping::builder()
            .device_name(&v.device_name)
            .ebs(
                EbsBlockDevice::builder()
                    .volume_size(i32::try_from(gb).unwrap_or(i32::MAX))
                    .volume_type(VolumeType::from(v.volume_type.as_str()))
                    .delete_on_termination(true)
                    .encrypted(v.encrypted)
                    .set_kms_key_id(v.kms_key_id.clone())
                    .build(),
            )
            .build()
    }

    async fn ensure(
        &self,
        token: &IdempotencyToken,
        req: &InstanceRequest,
        deadline: Instant,
        fence: &Fence,
    ) -> Result<InstanceObservation, AdapterError> {
        // Observe before act: an earlier attempt may have launched the instance already.
        let found = self.find_by_token(token, Some(fence)).await?;
        let (obs, instance) = match found.and_then(|i| Some((observation(&i, true)?, i))) {
            Some((obs, instance)) => {
                info!(
                    instance_id = %obs.instance_id,
                    state = %obs.state,
                    "adopting the instance an earlier attempt launched"
                );
                (obs, instance)
            }
            None => {
                // Resolve parameters only now: a bad plan must not hide an existing instance.
                let launch = self.launch_params(token, req)?;
                let (obs, instance) = self.run_instance(token, req, &launch, fence).await?;
                self.settle_launch(token, obs, instance, fence).await?
            }
        };
        if !self.config.wait_for_running {
            return self.with_data_volume(obs, Some(&instance)).await;
        }
        let id = obs.instance_id.clone();
        let adopted = obs.adopted;
        // The last instance a poll saw: its block device mappings name the data volume (those
        // of a launch's answer are usually still empty).
        let polled: Mutex<Option<Instance>> = Mutex::new(None);
        let obs = wait_until_running(obs, deadline, self.poll_policy(), || async {
            let seen = self.observe_by_id(&id).await?;
            let obs = seen.as_ref().and_then(|i| observation(i, adopted));
            if let (Some(i), Ok(mut last)) = (seen, polled.lock()) {
                *last = Some(i);
            }
            Ok(obs)
        })
        .await?;
        let last = polled.into_inner().ok().flatten().unwrap_or(instance);
        self.with_data_volume(obs, Some(&last)).await
    }

    async fn resize(
        &self,
        token: &IdempotencyToken,
        req: &ResizeRequest,
        deadline: Instant,
        fence: &Fence,
    ) -> Result<InstanceObservation, AdapterError> {
        let wanted = self.instance_type_for(&req.plan, req.instance_type.as_deref());
        // Observe first: by the token tag, so only the machine this token launched is touched.
        let not_found = || {
            AdapterError::permanent(format!(
                "no live managed instance carries {TAG_TOKEN}={token} (resource {}): it was \
                 terminated outside setpoint. The resync heals the resource with a new machine \
                 of the new plan; cancel this unit",
                req.resource_id
            ))
            .with_code(CODE_MACHINE_NOT_FOUND)
        };
        let instance = self
            .find_by_token(token, Some(fence))
            .await?
            .ok_or_else(not_found)?;
        let obs = observation(&instance, true).ok_or_else(not_found)?;
        let mut obs = self.with_data_volume(obs, Some(&instance)).await?;
        // The volume first: a size that can never be reached (smaller) is refused before the
        // instance is stopped for a type change, and growing needs no stop at all.
        if let Some(gb) = req.data_volume_gb {
            obs.data_volume = Some(self.grow_data_volume(&obs, gb, fence).await?);
        }
        let id = obs.instance_id.clone();
        // tokio's clock (not std's), like `wait_until_running`.
        let deadline = tokio::time::Instant::from_std(deadline);
        let policy = self.poll_policy();
        let mut pause = policy.initial;
        loop {
            let step = resize_step(obs.state, obs.instance_type.as_deref() == Some(&wanted));
            match step {
                ResizeStep::Done => {
                    info!(instance_id = %id, instance_type = %wanted, "instance runs with the wanted type");
                    return Ok(obs);
                }
                ResizeStep::Lost => {
                    return Err(AdapterError::permanent(format!(
                        "instance {id} went to {} during the resize (terminated outside \
                         setpoint); the resync heals the resource, cancel this unit",
                        obs.state
                    ))
                    .with_code(CODE_MACHINE_NOT_FOUND));
                }
                ResizeStep::Wait => {}
                ResizeStep::Stop => {
                    info!(
                        instance_id = %id,
                        from = obs.instance_type.as_deref().unwrap_or("?"),
                        to = %wanted,
                        "stopping the instance to change its type (StopInstances)"
                    );
                    fence.check()?;
                    let out = self
                        .budgets
                        .mutating
                        .call(async {
                            self.client
                                .stop_instances()
                                .instance_ids(&id)
                                .send()
                                .await
                                .map_err(|e| classify("StopInstances", &e))
                        })
                        .await?;
                    apply_state_change(&mut obs, out.stopping_instances());
                }
                ResizeStep::Modify => {
                    info!(instance_id = %id, to = %wanted, "changing the instance type (ModifyInstanceAttribute)");
                    fence.check()?;
                    self.budgets
                        .mutating
                        .call(async {
                            self.client
                                .modify_instance_attribute()
                                .instance_id(&id)
                                .instance_type(AttributeValue::builder().value(&wanted).build())
                                .send()
                                .await
                                .map_err(|e| classify("ModifyInstanceAttribute", &e))
                        })
                        .await?;
                    obs.instance_type = Some(wanted.clone());
                    // Stopped with the new type: the next step (start) needs no wait.
                    continue;
                }
                ResizeStep::Start => {
                    info!(instance_id = %id, instance_type = %wanted, "starting the instance (StartInstances)");
                    fence.check()?;
                    let out = self
                        .budgets
                        .mutating
                        .call(async {
                            self.client
                                .start_instances()
                                .instance_ids(&id)
                                .send()
                                .await
                                .map_err(|e| classify("StartInstances", &e))
                        })
                        .await?;
                    apply_state_change(&mut obs, out.starting_instances());
                }
            }
            // Wait for the state to move on, within the deadline.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left <= POLL_MARGIN {
                info!(
                    instance_id = %id,
                    state = %obs.state,
                    "deadline reached during the resize; the retry continues from this state"
                );
                return Ok(obs);
            }
            tokio::time::sleep(pause.min(left - POLL_MARGIN)).await;
            pause = (pause * 2).min(policy.max);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.observe_by_id(&id)).await {
                Ok(Ok(Some(i))) => {
                    if let Some(mut next) = observation(&i, true) {
                        // The volume was observed (and grown) above; a poll of the instance
                        // does not read it again.
                        next.data_volume = obs.data_volume.take();
                        obs = next;
                    }
                }
                // Not visible (eventual consistency): keep the last observation and poll again.
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(obs),
            }
        }
    }

    /// Grows the data volume of the observed instance to `gb` GiB, if it is smaller: at the
    /// size, or already being given it, nothing is sent. Smaller than the volume is refused
    /// (EBS volumes cannot shrink). Returns the volume as it now stands.
    async fn grow_data_volume(
        &self,
        obs: &InstanceObservation,
        gb: u32,
        fence: &Fence,
    ) -> Result<DataVolume, AdapterError> {
        let device = &self.config.data_volume.device_name;
        let Some(volume) = obs.data_volume.clone() else {
            return Err(AdapterError::permanent(format!(
                "instance {} has no data volume at {device} (ec2.data_volume.device_name), so it \
                 cannot be given {gb} GiB: it was launched without one, or with another device \
                 name. Replace the machine (or restore the device name), then retry the unit",
                obs.instance_id
            ))
            .with_code(CODE_NO_DATA_VOLUME));
        };
        let current = volume.effective_size_gb();
        if gb < current {
            return Err(AdapterError::permanent(format!(
                "the data volume {} of instance {} has {current} GiB and cannot shrink to {gb} \
                 GiB (EBS volumes only grow); ask for {current} GiB or more",
                volume.volume_id, obs.instance_id
            ))
            .with_code(CODE_VOLUME_SHRINK));
        }
        if gb == current {
            info!(volume_id = %volume.volume_id, size_gb = gb, "data volume has the wanted size");
            return Ok(volume);
        }
        info!(
            volume_id = %volume.volume_id,
            from = current,
            to = gb,
            "growing the data volume (ModifyVolume)"
        );
        let started = volume.modification.as_ref().and_then(|m| m.started_at);
        self.budgets.mutating.take().await?;
        fence.check()?;
        let out = self
            .client
            .modify_volume()
            .volume_id(&volume.volume_id)
            .size(i32::try_from(gb).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| {
                volume_change_refused(
                    classify("ModifyVolume", &e),
                    e.message(),
                    &volume.volume_id,
                    started,
                    SystemTime::now(),
                )
            })?;
        Ok(DataVolume {
            modification: out
                .volume_modification()
                .map(modification)
                .or(volume.modification.clone()),
            ..volume
        })
    }

    /// One page of live managed instances, optionally of one resource.
    async fn list(&self, req: &ListMachinesRequest) -> Result<MachinePage, AdapterError> {
        let resource = req.resource_id.map(|r| r.to_string());
        let mut filters = vec![
            filter(&format!("tag:{TAG_MANAGED}"), ["true"]),
            filter("instance-state-name", LIVE_STATES),
        ];
        if let Some(r) = &resource {
            filters.push(filter(&format!("tag:{TAG_RESOURCE}"), [r.as_str()]));
        }
        let (min, max) = LIST_PAGE_BOUNDS;
        let size = req
            .page_size
            .unwrap_or(DEFAULT_LIST_PAGE_SIZE)
            .clamp(min, max);
        let page = self
            .budgets
            .describe
            .call(async {
                self.client
                    .describe_instances()
                    .set_filters(Some(filters))
                    .max_results(i32::try_from(size).unwrap_or(1000))
                    .set_next_token(req.page_token.clone())
                    .send()
                    .await
                    .map_err(|e| classify("DescribeInstances", &e))
            })
            .await?;
        let machines = page
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(managed_machine)
            .collect();
        Ok(MachinePage {
            machines,
            next_page_token: page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    async fn terminate(
        &self,
        req: &TerminateRequest,
        fence: &Fence,
    ) -> Result<TerminateOutcome, AdapterError> {
        if req.is_empty() {
            return Err(AdapterError::permanent(
                "terminate names no instance: give instance_id, resource_id or launch_token",
            )
            .with_code("ec2-empty-terminate"));
        }
        let mut outcome = TerminateOutcome::default();
        let mut targets = BTreeSet::new();

        if let Some(id) = &req.instance_id {
            match self.observe_by_id(id).await? {
                None => outcome.already_gone.push(id.clone()),
                Some(i) if observation(&i, true).is_some_and(|o| o.state.is_gone()) => {
                    outcome.already_gone.push(id.clone());
                }
                Some(i) if !has_tag(&i, TAG_MANAGED, "true") => {
                    return Err(AdapterError::permanent(format!(
                        "refusing to terminate {id}: it is not tagged {TAG_MANAGED}=true, so \
                         setpoint did not launch it; check the id recorded on the resource"
                    ))
                    .with_code("ec2-unmanaged"));
                }
                Some(_) => {
                    targets.insert(id.clone());
                }
            }
        }
        if let Some(resource_id) = req.resource_id {
            for i in self
                .live_tagged(TAG_RESOURCE, &resource_id.to_string())
                .await?
            {
                targets.extend(i.instance_id().map(str::to_owned));
            }
        }
        if let Some(launch_token) = &req.launch_token {
            for i in self.live_tagged(TAG_TOKEN, launch_token.as_str()).await? {
                targets.extend(i.instance_id().map(str::to_owned));
            }
        }
        if targets.is_empty() {
            info!("nothing to terminate: already gone");
            return Ok(outcome);
        }

        let ids: Vec<String> = targets.into_iter().collect();
        info!(instance_ids = ?ids, "terminating (TerminateInstances)");
        let done = self.terminate_ids_tolerant(ids, fence).await?;
        outcome.terminated.extend(done.terminated);
        outcome.already_gone.extend(done.already_gone);
        Ok(outcome)
    }

    /// Terminates `ids` after checking `fence`; an id EC2 no longer knows is already gone, and
    /// one already shutting down or terminated is terminated again without error (EC2 and
    /// moto accept that), so a retry is harmless.
    async fn terminate_ids_tolerant(
        &self,
        ids: Vec<String>,
        fence: &Fence,
    ) -> Result<TerminateOutcome, AdapterError> {
        let mut outcome = TerminateOutcome::default();
        if ids.is_empty() {
            return Ok(outcome);
        }
        fence.check()?;
        match self.terminate_ids(&ids).await {
            Ok(()) => outcome.terminated.extend(ids),
            // One unknown id fails the whole call; fall back to one call per id.
            Err(e) if is_not_found(&e) && ids.len() > 1 => {
                for id in ids {
                    fence.check()?;
                    match self.terminate_ids(std::slice::from_ref(&id)).await {
                        Ok(()) => outcome.terminated.push(id),
                        Err(e) if is_not_found(&e) => outcome.already_gone.push(id),
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) if is_not_found(&e) => outcome.already_gone.extend(ids),
            Err(e) => return Err(e),
        }
        Ok(outcome)
    }

    async fn terminate_ids(&self, ids: &[String]) -> Result<(), AdapterError> {
        self.budgets
            .mutating
            .call(async {
                self.client
                    .terminate_instances()
                    .set_instance_ids(Some(ids.to_vec()))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("TerminateInstances", &e))
            })
            .await
    }
}

impl Compute for Ec2Compute {
    fn ensure_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a InstanceRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        let span = info_span!(
            "ec2.ensure_instance",
            %token,
            resource_id = %request.resource_id,
            tenant = %request.tenant,
            plan = %request.plan,
        );
        Box::pin(
            self.ensure(token, request, deadline, fence)
                .instrument(span),
        )
    }

    fn describe_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
    ) -> BoxFuture<'a, Result<Option<InstanceObservation>, AdapterError>> {
        let span = info_span!("ec2.describe_instance", %token);
        Box::pin(self.observe_by_token(token).instrument(span))
    }

    fn describe_instances<'a>(
        &'a self,
        tokens: &'a [IdempotencyToken],
    ) -> BoxFuture<'a, Result<Vec<Option<InstanceObservation>>, AdapterError>> {
        let span = info_span!("ec2.describe_instances", tokens = tokens.len());
        Box::pin(self.observe_by_tokens(tokens).instrument(span))
    }

    fn resize_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a ResizeRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        let span = info_span!(
            "ec2.resize_instance",
            launch_token = %token,
            resource_id = %request.resource_id,
            plan = %request.plan,
            data_volume_gb = request.data_volume_gb,
        );
        Box::pin(
            self.resize(token, request, deadline, fence)
                .instrument(span),
        )
    }

    fn terminate_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a TerminateRequest,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<TerminateOutcome, AdapterError>> {
        let span = info_span!(
            "ec2.terminate_instance",
            %token,
            instance_id = request.instance_id.as_deref().unwrap_or(""),
            resource_id = request.resource_id.map(|r| r.to_string()).unwrap_or_default(),
        );
        Box::pin(self.terminate(request, fence).instrument(span))
    }

    fn list_managed_machines<'a>(
        &'a self,
        request: &'a ListMachinesRequest,
    ) -> BoxFuture<'a, Result<MachinePage, AdapterError>> {
        let span = info_span!(
            "ec2.list_managed_machines",
            region = %self.config.region,
            resource_id = request.resource_id.map(|r| r.to_string()).unwrap_or_default(),
        );
        Box::pin(self.list(request).instrument(span))
    }
}

/// What `RunInstances` is called with, resolved once per attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LaunchParams {
    image_id: String,
    instance_type: String,
    subnet_id: Option<String>,
    data_volume_gb: Option<u32>,
}

/// The next step of a resize, from the observed state and whether the type is already right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResizeStep {
    /// Runs with the wanted type: nothing to do.
    Done,
    /// Runs with another type: stop it first (the type can only change while stopped).
    Stop,
    /// Stopped with another type: change the type.
    Modify,
    /// Stopped with the wanted type (resized, or stopped behind setpoint's back): start it.
    Start,
    /// Pending or stopping (or a state we do not know): wait for it to settle.
    Wait,
    /// Shutting down or terminated: nothing left to resize.
    Lost,
}

/// Chooses the resize step from what is observed, never from what an earlier attempt did.
pub(crate) fn resize_step(state: InstanceState, has_wanted_type: bool) -> ResizeStep {
    match (state, has_wanted_type) {
        (InstanceState::Running, true) => ResizeStep::Done,
        (InstanceState::Running, false) => ResizeStep::Stop,
        (InstanceState::Stopped, false) => ResizeStep::Modify,
        (InstanceState::Stopped, true) => ResizeStep::Start,
        (InstanceState::ShuttingDown | InstanceState::Terminated, _) => ResizeStep::Lost,
        (InstanceState::Pending | InstanceState::Stopping | InstanceState::Unknown, _) => {
            ResizeStep::Wait
        }
    }
}

/// Takes the new state from a Stop/StartInstances answer (EC2 reports it for each instance).
fn apply_state_change(obs: &mut InstanceObservation, changes: &[InstanceStateChange]) {
    if let Some(name) = changes
        .iter()
        .find(|c| c.instance_id() == Some(obs.instance_id.as_str()))
        .and_then(|c| c.current_state())
        .and_then(|s| s.name())
    {
        obs.state = InstanceState::parse(name.as_str());
    }
}

/// Polls `describe` while the instance is `pending`, with pauses doubling from
/// `policy.initial` to `policy.max`, and returns the last observation no later than `deadline`
/// (still `pending` if time ran out: the engine checks again on its next attempt).
///
/// A failed poll ends the wait with the last good observation (the instance exists; a poll is
/// not worth failing the unit for). An instance that goes away while starting is a permanent
/// error: EC2 would answer the same token with the same dead instance.
pub(crate) async fn wait_until_running<F, Fut>(
    mut obs: InstanceObservation,
    deadline: Instant,
    policy: PollPolicy,
    mut describe: F,
) -> Result<InstanceObservation, AdapterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<InstanceObservation>, AdapterError>>,
{
    // tokio's clock (not std's), so tests with a paused clock run this loop instantly.
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut pause = policy.initial;
    while obs.state == InstanceState::Pending {
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left <= POLL_MARGIN {
            info!(instance_id = %obs.instance_id, "deadline reached while pending; returning");
            break;
        }
        tokio::time::sleep(pause.min(left - POLL_MARGIN)).await;
        pause = (pause * 2).min(policy.max);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, describe()).await {
            Ok(Ok(Some(next))) => {
                if next.state.is_gone() {
                    return Err(gone_while_starting(&next));
                }
                obs = next;
            }
            // Not visible yet (EC2's describe is eventually consistent right after a launch).
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(instance_id = %obs.instance_id, error = %e, "poll failed; returning");
                break;
            }
            Err(_) => break,
        }
    }
    Ok(obs)
}

fn gone_while_starting(obs: &InstanceObservation) -> AdapterError {
    AdapterError::permanent(format!(
        "instance {} went to {} while starting (capacity or a failed launch); EC2 answers this \
         unit's token with the same instance, so retrying cannot help: cancel the unit and \
         recreate the resource",
        obs.instance_id, obs.state
    ))
    .with_code("ec2-instance-lost")
}

fn is_not_found(e: &AdapterError) -> bool {
    e.class == ErrorClass::Permanent && e.code.as_deref() == Some("InvalidInstanceID.NotFound")
}

/// The order in which the instances carrying one token are ranked: launch time, then id.
/// The first is the one every attempt adopts ([`Ec2Compute::keep_one`]).
type LaunchOrder = (Option<(i64, u32)>, Option<String>);

fn launch_order(i: &Instance) -> LaunchOrder {
    (
        i.launch_time().map(|t| (t.secs(), t.subsec_nanos())),
        i.instance_id().map(str::to_owned),
    )
}

fn filter<const N: usize>(name: &str, values: [&str; N]) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.iter().map(|v| (*v).to_owned()).collect()))
        .build()
}

fn filter_values(name: &str, values: Vec<String>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values))
        .build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn has_tag(i: &Instance, key: &str, value: &str) -> bool {
    i.tags()
        .iter()
        .any(|t| t.key() == Some(key) && t.value() == Some(value))
}

/// The SDK-neutral view of an EC2 instance; `None` if it has no id.
pub(crate) fn observation(i: &Instance, adopted: bool) -> Option<InstanceObservation> {
    Some(InstanceObservation {
        instance_id: i.instance_id()?.to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| InstanceState::parse(n.as_str()))
            .unwrap_or(InstanceState::Unknown),
        private_ip: i.private_ip_address().map(str::to_owned),
        availability_zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .map(str::to_owned),
        subnet_id: i.subnet_id().map(str::to_owned),
        instance_type: i.instance_type().map(|t| t.as_str().to_owned()),
        data_volume: None,
        adopted,
    })
}

/// The id of the EBS volume `i` has at `device`, from its block device mappings.
pub(crate) fn data_volume_id(i: &Instance, device: &str) -> Option<String> {
    i.block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(device))
        .and_then(|m| m.ebs())
        .and_then(|ebs| ebs.volume_id())
        .map(str::to_owned)
}

/// The most recently started of a volume's modifications (AWS reports the latest per volume;
/// moto reports them all).
fn latest_modification(all: &[Ec2Modification]) -> Option<VolumeModification> {
    all.iter()
        .max_by_key(|m| m.start_time().map(|t| (t.secs(), t.subsec_nanos())))
        .map(modification)
}

/// The SDK-neutral view of an EBS volume modification.
fn modification(m: &Ec2Modification) -> VolumeModification {
    VolumeModification {
        state: m
            .modification_state()
            .map(|s| VolumeModificationState::parse(s.as_str()))
            .unwrap_or(VolumeModificationState::Unknown),
        target_size_gb: m.target_size().map(|s| gib(Some(s))),
        started_at: m.start_time().and_then(system_time),
    }
}

/// A size EC2 reports as `i32` GiB; absent or negative reads as 0.
fn gib(size: Option<i32>) -> u32 {
    size.and_then(|s| u32::try_from(s).ok()).unwrap_or(0)
}

fn system_time(t: &DateTime) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

fn tag_value<'a>(i: &'a Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The listing's view of a managed instance; `None` if it has no id. Tags that are missing or
/// malformed read as `None` (the sweep reports such a machine as belonging to no resource).
pub(crate) fn managed_machine(i: &Instance) -> Option<ManagedMachine> {
    Some(ManagedMachine {
        instance_id: i.instance_id()?.to_owned(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| InstanceState::parse(n.as_str()))
            .unwrap_or(InstanceState::Unknown),
        resource_id: tag_value(i, TAG_RESOURCE).and_then(|v| Uuid::parse_str(v).ok()),
        launch_token: tag_value(i, TAG_TOKEN).and_then(|v| IdempotencyToken::parse(v).ok()),
        tenant: tag_value(i, TAG_TENANT).map(str::to_owned),
        launch_time: i.launch_time().and_then(system_time),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn obs(state: InstanceState) -> InstanceObservation {
        InstanceObservation {
            instance_id: "i-1".into(),
            state,
            private_ip: None,
            availability_zone: None,
            subnet_id: None,
            instance_type: None,
            data_volume: None,
            adopted: false,
        }
    }

    const POLICY: PollPolicy = PollPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(8),
    };

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_returns_pending_without_polling() {
        let polls = Mutex::new(0);
        let got = wait_until_running(obs(InstanceState::Pending), Instant::now(), POLICY, || {
            *polls.lock().unwrap() += 1;
            async { Ok(Some(obs(InstanceState::Running))) }
        })
        .await
        .unwrap();
        assert_eq!(got.state, InstanceState::Pending);
        assert_eq!(*polls.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_with_capped_backoff_until_running() {
        let polls = Mutex::new(Vec::new());
        let start = tokio::time::Instant::now();
        let got = wait_until_running(
            obs(InstanceState::Pending),
            Instant::now() + Duration::from_secs(600),
            POLICY,
            || {
                let mut p = polls.lock().unwrap();
                p.push(start.elapsed().as_secs());
                let state = if p.len() < 6 {
                    InstanceState::Pending
                } else {
                    InstanceState::Running
                };
                async move { Ok(Some(obs(state))) }
            },
        )
        .await
        .unwrap();
        assert_eq!(got.state, InstanceState::Running);
        // Pauses 1, 2, 4, 8, 8, 8 (virtual time): doubling, capped at 8.
        assert_eq!(*polls.lock().unwrap(), vec![1, 3, 7, 15, 23, 31]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_pending_instance_is_returned_pending_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let got = wait_until_running(obs(InstanceState::Pending), deadline, POLICY, || async {
            Ok(Some(obs(InstanceState::Pending)))
        })
        .await
        .unwrap();
        assert_eq!(got.state, InstanceState::Pending);
        assert!(tokio::time::Instant::now() <= tokio::time::Instant::from_std(deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn poll_errors_keep_the_last_observation_and_lost_instances_are_permanent() {
        let far = Instant::now() + Duration::from_secs(600);
        let got = wait_until_running(obs(InstanceState::Pending), far, POLICY, || async {
            Err(AdapterError::transient("throttled"))
        })
        .await
        .unwrap();
        assert_eq!(got.state, InstanceState::Pending);

        let err = wait_until_running(obs(InstanceState::Pending), far, POLICY, || async {
            Ok(Some(obs(InstanceState::Terminated)))
        })
        .await
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::Permanent);
        assert_eq!(err.code.as_deref(), Some("ec2-instance-lost"));
    }

    #[test]
    fn resize_steps_follow_the_observed_state_only() {
        use InstanceState::*;
        use ResizeStep::*;
        for (state, has_type, step) in [
            (Running, true, Done),
            (Running, false, Stop),
            (Stopping, false, Wait),
            (Stopping, true, Wait),
            (Stopped, false, Modify),
            (Stopped, true, Start),
            (Pending, true, Wait),
            (Pending, false, Wait),
            (Unknown, false, Wait),
            (ShuttingDown, true, Lost),
            (Terminated, false, Lost),
        ] {
            assert_eq!(resize_step(state, has_type), step, "{state} {has_type}");
        }
    }

    #[test]
    fn state_changes_apply_to_the_observed_instance_only() {
        use aws_sdk_ec2::types::{InstanceState as Ec2State, InstanceStateName};
        let change = |id: &str, name| {
            InstanceStateChange::builder()
                .instance_id(id)
                .current_state(Ec2State::builder().name(name).build())
                .build()
        };
        let mut o = obs(InstanceState::Running);
        apply_state_change(&mut o, &[change("i-2", InstanceStateName::Stopped)]);
        assert_eq!(o.state, InstanceState::Running);
        apply_state_change(&mut o, &[change("i-1", InstanceStateName::Stopping)]);
        assert_eq!(o.state, InstanceState::Stopping);
    }

    #[test]
    fn launch_params_follow_spec_then_plan_then_defaults() {
        let mut config = Ec2Config::new("us-east-1");
        config.default_image_id = Some("ami-default".into());
        config.plans.insert(
            "kvx.large".into(),
            crate::PlanConfig {
                image_id: Some("ami-large".into()),
                instance_type: Some("m6i.large".into()),
            },
        );
        let client = Client::from_conf(
            aws_sdk_ec2::Config::builder()
                .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
                .region(aws_sdk_ec2::config::Region::new("us-east-1"))
                .build(),
        );
        let c = Ec2Compute::from_client(client, config);
        let token = IdempotencyToken::parse("t").unwrap();
        let mut req = InstanceRequest {
            resource_id: uuid::Uuid::nil(),
            tenant: "acme".into(),
            plan: "kvx.large".into(),
            name: None,
            image_id: None,
            instance_type: None,
            subnet_id: Some("subnet-pinned".into()),
            data_volume_gb: Some(20),
        };
        let p = c.launch_params(&token, &req).unwrap();
        assert_eq!(
            (p.image_id.as_str(), p.instance_type.as_str()),
            ("ami-large", "m6i.large")
        );
        assert_eq!(p.subnet_id.as_deref(), Some("subnet-pinned"));
        assert_eq!(p.data_volume_gb, Some(20));
        let m = c.data_volume_mapping(20);
        assert_eq!(m.device_name(), Some("/dev/sdf"));
        let ebs = m.ebs().unwrap();
        assert_eq!(ebs.volume_size(), Some(20));
        assert_eq!(ebs.volume_type(), Some(&VolumeType::Gp3));
        assert_eq!(ebs.delete_on_termination(), Some(true));
        assert_eq!(ebs.encrypted(), Some(true));
        assert_eq!(ebs.kms_key_id(), None);
        req.plan = "kvx.unknown".into();
        req.instance_type = Some("t3.nano".into());
        let p = c.launch_params(&token, &req).unwrap();
        assert_eq!(
            (p.image_id.as_str(), p.instance_type.as_str()),
            ("ami-default", "t3.nano")
        );

        req.data_volume_gb = Some(0);
        let e = c.launch_params(&token, &req).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("ec2-bad-volume-size"));

        let c = Ec2Compute::from_client(c.client.clone(), Ec2Config::new("us-east-1"));
        let e = c.launch_params(&token, &req).unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(e.message.contains("default_image_id"), "{e}");
    }

    #[test]
    fn the_data_volume_is_found_by_its_device_and_its_latest_modification_counts() {
        use aws_sdk_ec2::types::{
            EbsInstanceBlockDevice, InstanceBlockDeviceMapping, VolumeModificationState as S,
        };
        let mapping = |device: &str, id: &str| {
            InstanceBlockDeviceMapping::builder()
                .device_name(device)
                .ebs(EbsInstanceBlockDevice::builder().volume_id(id).build())
                .build()
        };
        let i = Instance::builder()
            .instance_id("i-1")
            .block_device_mappings(mapping("/dev/xvda", "vol-root"))
            .block_device_mappings(mapping("/dev/sdf", "vol-data"))
            .build();
        assert_eq!(data_volume_id(&i, "/dev/sdf").as_deref(), Some("vol-data"));
        assert_eq!(data_volume_id(&i, "/dev/sdg"), None);

        let m = |secs, state, target| {
            Ec2Modification::builder()
                .start_time(DateTime::from_secs(secs))
                .modification_state(state)
                .target_size(target)
                .build()
        };
        let latest = latest_modification(&[
            m(100, S::Completed, 20),
            m(300, S::Optimizing, 40),
            m(200, S::Completed, 30),
        ])
        .unwrap();
        assert_eq!(latest.state, VolumeModificationState::Optimizing);
        assert_eq!(latest.target_size_gb, Some(40));
        assert_eq!(
            latest.started_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(300))
        );
        assert_eq!(latest_modification(&[]), None);
        assert_eq!(gib(Some(-1)), 0);
    }

    #[test]
    fn managed_machines_read_their_tags_and_tolerate_bad_ones() {
        use aws_sdk_ec2::types::{InstanceState as Ec2State, InstanceStateName};
        let resource = Uuid::new_v4();
        let i = Instance::builder()
            .instance_id("i-1")
            .state(Ec2State::builder().name(InstanceStateName::Stopped).build())
            .launch_time(DateTime::from_secs(1_700_000_000))
            .tags(tag(TAG_RESOURCE, &resource.to_string()))
            .tags(tag(TAG_TOKEN, "tok-1"))
            .tags(tag(TAG_TENANT, "acme"))
            .build();
        let m = managed_machine(&i).unwrap();
        assert_eq!(m.instance_id, "i-1");
        assert_eq!(m.state, InstanceState::Stopped);
        assert_eq!(m.resource_id, Some(resource));
        assert_eq!(m.launch_token.as_ref().map(|t| t.as_str()), Some("tok-1"));
        assert_eq!(m.tenant.as_deref(), Some("acme"));
        assert_eq!(
            m.launch_time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        let bad = Instance::builder()
            .instance_id("i-2")
            .tags(tag(TAG_RESOURCE, "not-a-uuid"))
            .tags(tag(TAG_TOKEN, &"x".repeat(65)))
            .build();
        let m = managed_machine(&bad).unwrap();
        assert_eq!(
            (m.resource_id, m.launch_token, m.tenant),
            (None, None, None)
        );
        assert_eq!(m.state, InstanceState::Unknown);
        assert!(managed_machine(&Instance::builder().build()).is_none());
    }
}
