//! The compute domain: virtual machines that the engine's workflows create, watch and delete.
//!
//! [`Compute`] is what the engine's KVX workflows call for a machine; `setpoint-ec2` implements
//! it on Amazon EC2, and another cloud implements it in its own crate. The request and result
//! types are plain named structs so a workflow reads `observation.private_ip`, not JSON.
//! Five operations: ensure (launch once per token), describe, resize (change the size of the
//! machine a token launched, and grow its data volume), terminate, and a read-only listing of
//! every live machine the provider manages (to adopt or report machines no resource records).
//! [`NopCompute`] and [`ComputeFns`] are test doubles for code that only needs *a* compute.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::AdapterError;
use crate::fence::Fence;
use crate::handler::BoxFuture;
use crate::token::IdempotencyToken;

/// What machine to ensure for a resource.
///
/// Everything a provider needs to make the *same* machine on every retry is in here or derived
/// from the token; a provider must not add anything that varies between attempts (a randomly
/// picked subnet, a timestamp in a name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRequest {
    /// The setpoint resource (row of `instances`) the machine belongs to; providers tag the
    /// machine with it so that deleting the resource finds every machine it ever had.
    pub resource_id: Uuid,
    /// The tenant owning the resource; recorded on the machine (tag) for cost and audit.
    pub tenant: String,
    /// The KVX plan (e.g. `kvx.small`); the provider maps it to an image and a machine size.
    pub plan: String,
    /// A display name for the machine (EC2 `Name` tag); the provider picks one when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Overrides the plan's image (AMI id on EC2).
    #[serde(default)]
    pub image_id: Option<String>,
    /// Overrides the plan's machine size (instance type on EC2).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Pins the network placement (subnet id on EC2). When absent the provider derives it from
    /// its configuration and the token, so every retry of a token lands in the same place.
    #[serde(default)]
    pub subnet_id: Option<String>,
    /// Size in GiB of the machine's data volume, made with the machine and deleted with it (EC2:
    /// an EBS volume in the launch's block device mappings). `None`: no data volume.
    #[serde(default)]
    pub data_volume_gb: Option<u32>,
}

/// The life-cycle state of a machine, as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Launched, not yet running.
    Pending,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped (exists, not running).
    Stopped,
    /// Being terminated; will not run again.
    ShuttingDown,
    /// Terminated; gone for good.
    Terminated,
    /// A state this crate does not know; treated as existing.
    Unknown,
}

impl InstanceState {
    /// The provider-neutral name: `pending`, `running`, `stopping`, `stopped`, `shutting-down`,
    /// `terminated` or `unknown` (the same strings as EC2's state names).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Unknown => "unknown",
        }
    }

    /// Parses a state name as [`InstanceState::as_str`] writes it; anything else is `Unknown`.
    pub fn parse(name: &str) -> Self {
        match name {
            "pending" => InstanceState::Pending,
            "running" => InstanceState::Running,
            "stopping" => InstanceState::Stopping,
            "stopped" => InstanceState::Stopped,
            "shutting-down" => InstanceState::ShuttingDown,
            "terminated" => InstanceState::Terminated,
            _ => InstanceState::Unknown,
        }
    }

    /// True for `shutting-down` and `terminated`: the machine is gone or going, and a new one
    /// must be launched to satisfy an ensure.
    pub fn is_gone(self) -> bool {
        matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provider knows about one machine. The engine records these fields on the resource
/// (observed state) when the unit completes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceObservation {
    /// The provider's id of the machine (EC2 instance id `i-…`).
    pub instance_id: String,
    /// Its state when observed.
    pub state: InstanceState,
    /// Its private IPv4 address, once assigned.
    pub private_ip: Option<String>,
    /// Its availability zone, once placed.
    pub availability_zone: Option<String>,
    /// Its subnet, once placed.
    pub subnet_id: Option<String>,
    /// Its size (EC2 instance type, e.g. `t3.small`), when the provider reports one.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Its data volume, when it has one and the provider could read it.
    #[serde(default)]
    pub data_volume: Option<DataVolume>,
    /// True when the machine was made by an earlier attempt with the same token and this call
    /// adopted it instead of creating one; false when this call created it. Only informative:
    /// the engine treats both the same.
    pub adopted: bool,
}

/// A machine's data volume as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataVolume {
    /// The provider's id of the volume (EBS volume id `vol-…`).
    pub volume_id: String,
    /// Its size in GiB as the provider reports it now. While a modification is under way the
    /// provider may still report the old size: `modification` has the target.
    pub size_gb: u32,
    /// The latest change of the volume's size or type, if it was ever changed.
    #[serde(default)]
    pub modification: Option<VolumeModification>,
}

impl DataVolume {
    /// The size the volume has or is being given: the larger of `size_gb` and the target of a
    /// modification that has not failed. What a resize compares the wanted size with.
    pub fn effective_size_gb(&self) -> u32 {
        match &self.modification {
            Some(m) if m.state != VolumeModificationState::Failed => {
                self.size_gb.max(m.target_size_gb.unwrap_or(0))
            }
            _ => self.size_gb,
        }
    }
}

/// The latest modification of a data volume (EC2: `DescribeVolumesModifications`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeModification {
    /// Where it stands.
    pub state: VolumeModificationState,
    /// The size in GiB it gives the volume, when it changes the size.
    #[serde(default)]
    pub target_size_gb: Option<u32>,
    /// When it started (providers limit how often a volume may change, counted from here).
    #[serde(default)]
    pub started_at: Option<SystemTime>,
}

/// The state of a volume modification (the same names as EBS's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeModificationState {
    /// Being applied; the new size is not usable yet.
    Modifying,
    /// The new size is usable; performance is still being adjusted.
    Optimizing,
    /// Done.
    Completed,
    /// Failed; the volume kept its previous settings.
    Failed,
    /// A state this crate does not know.
    Unknown,
}

impl VolumeModificationState {
    /// `modifying`, `optimizing`, `completed`, `failed` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeModificationState::Modifying => "modifying",
            VolumeModificationState::Optimizing => "optimizing",
            VolumeModificationState::Completed => "completed",
            VolumeModificationState::Failed => "failed",
            VolumeModificationState::Unknown => "unknown",
        }
    }

    /// Parses a name as [`VolumeModificationState::as_str`] writes it; anything else is
    /// `Unknown`.
    pub fn parse(name: &str) -> Self {
        match name {
            "modifying" => VolumeModificationState::Modifying,
            "optimizing" => VolumeModificationState::Optimizing,
            "completed" => VolumeModificationState::Completed,
            "failed" => VolumeModificationState::Failed,
            _ => VolumeModificationState::Unknown,
        }
    }
}

impl fmt::Display for VolumeModificationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error code of a [`Compute::resize_instance`] that finds no live machine for its token.
pub const CODE_MACHINE_NOT_FOUND: &str = "machine-not-found";

/// The error code of a [`Compute::resize_instance`] asked for a data volume smaller than the
/// one the machine has (volumes only grow).
pub const CODE_VOLUME_SHRINK: &str = "volume-shrink";

/// The error code of a [`Compute::resize_instance`] asked for a data volume size on a machine
/// that has no data volume (launched without one, e.g. by a release before data volumes).
pub const CODE_NO_DATA_VOLUME: &str = "no-data-volume";

/// What size a [`Compute::resize_instance`] call gives a machine.
///
/// The size is resolved the way [`Compute::ensure_instance`] resolves it for a launch:
/// `instance_type` if set, else the provider's size for `plan`, else its default. So a plan
/// change resizes to exactly the size a new launch of that plan would get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeRequest {
    /// The setpoint resource the machine belongs to (for logs and errors).
    pub resource_id: Uuid,
    /// The KVX plan whose machine size is wanted (e.g. `kvx.medium`).
    pub plan: String,
    /// Overrides the plan's machine size (instance type on EC2).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// The wanted size in GiB of the machine's data volume. A larger size grows the volume in
    /// place; the same size changes nothing; a smaller one is refused ([`CODE_VOLUME_SHRINK`]).
    /// `None` leaves the volume alone.
    #[serde(default)]
    pub data_volume_gb: Option<u32>,
}

/// Which machines a [`Compute::terminate_instance`] call removes.
///
/// The provider terminates the union of: `instance_id`, every managed machine tagged with
/// `resource_id`, and every managed machine tagged with `launch_token`. Deleting by resource is
/// what makes "a create crashed before it recorded the id, then the user deleted" safe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateRequest {
    /// The machine id recorded on the resource, if any.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The resource whose machines to terminate.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// The token of the unit that launched the machine, if known.
    #[serde(default)]
    pub launch_token: Option<IdempotencyToken>,
}

impl TerminateRequest {
    /// True when the request names nothing to terminate (a caller bug; providers reject it as a
    /// permanent error rather than guess).
    pub fn is_empty(&self) -> bool {
        self.instance_id.is_none() && self.resource_id.is_none() && self.launch_token.is_none()
    }
}

/// The result of [`Compute::terminate_instance`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateOutcome {
    /// Machines this call asked the provider to terminate (they were still there).
    pub terminated: Vec<String>,
    /// Machines that were already terminated or unknown to the provider ("already gone").
    pub already_gone: Vec<String>,
}

/// Which managed machines a [`Compute::list_managed_machines`] call returns: one page of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMachinesRequest {
    /// Only the machines tagged with this resource; all managed machines when absent.
    #[serde(default)]
    pub resource_id: Option<Uuid>,
    /// Where to continue: the `next_page_token` of the previous page; the first page when
    /// absent.
    #[serde(default)]
    pub page_token: Option<String>,
    /// At most this many machines per page (a hint: the provider may clamp it to its own
    /// limits, and may return fewer, even none, on a page that is not the last).
    #[serde(default)]
    pub page_size: Option<u32>,
}

/// One live machine the provider manages, as its tags describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedMachine {
    /// The provider's id of the machine.
    pub instance_id: String,
    /// Its state (never gone: only live machines are listed).
    pub state: InstanceState,
    /// The resource it was launched for; `None` when the tag is missing or not a resource id.
    pub resource_id: Option<Uuid>,
    /// The token that launched it; `None` when the tag is missing or not a token.
    pub launch_token: Option<IdempotencyToken>,
    /// The tenant it was launched for; `None` when the tag is missing.
    pub tenant: Option<String>,
    /// When it was launched, when the provider reports it.
    pub launch_time: Option<SystemTime>,
}

/// One page of [`Compute::list_managed_machines`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachinePage {
    /// The machines on this page.
    pub machines: Vec<ManagedMachine>,
    /// Pass it as `page_token` for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Virtual machines, one per resource, identified by the idempotency token that launched them.
///
/// # Rules every implementation keeps
/// - **Idempotent.** Every method may be called any number of times with the same arguments,
///   concurrently with itself after a crash, and must leave the world as one call would.
/// - **Observe before act.** A mutating method first looks for what an earlier attempt with the
///   same token made (EC2: a tag `setpoint:token=<token>`) and adopts it; only then creates.
/// - **Create tolerates "already exists"**: finding the machine is success, not an error.
/// - **Terminate tolerates "absent"**: already terminated or unknown is success.
/// - **Bounded.** No method blocks past the deadline it is given (or, without one, past the
///   provider's configured timeouts); a machine still starting is reported as `pending`.
/// - **Classified errors.** Every failure is an [`AdapterError`] that says whether a retry can
///   help; messages are for a person and never contain credentials.
/// - **Cancel-safe.** The engine may drop a returned future at any await point (shutdown, a
///   lost lease); the next attempt with the same token must still converge.
/// - **Fenced.** A mutating method calls [`Fence::check`] on its `fence` immediately before
///   every call that changes the world (launch, stop, resize, grow a volume, start, terminate),
///   so an attempt that lost its unit stops before another attempt acts; it changes nothing
///   once the check fails.
pub trait Compute: Send + Sync + 'static {
    /// Makes sure one machine exists for `token`, launching it only if no earlier attempt did.
    ///
    /// Called by the create workflow's `ensure-instance` unit, on its first run and on every
    /// retry, always with that unit's token. May launch exactly one machine per token (and tag
    /// it with the token, the resource and the tenant); changes nothing else, but for one
    /// repair: where the provider does not honour client tokens (moto), two attempts that
    /// raced (a stale one past its lease and the live one) can both launch, and then every
    /// attempt adopts the same machine, the oldest (launch time, then id), and a provider
    /// terminates the others carrying the token once `fence` is checked. The observation names
    /// the adopted machine only. Waits for the machine to run until `deadline` at the latest,
    /// then returns what it sees (possibly [`InstanceState::Pending`]) so the engine can check
    /// again later.
    ///
    /// # Errors
    /// Transient for throttling, capacity, timeouts, 5xx and connection failures; permanent for
    /// a request the provider will never accept (bad image, bad size, no permission).
    fn ensure_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a InstanceRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>>;

    /// The machine launched with `token`, if one exists and is not terminated; of several
    /// (see [`Compute::ensure_instance`]), the one ensure adopts (EC2: the oldest).
    ///
    /// Called by workflows that need the current state (e.g. before configuring the cluster)
    /// and by the drift check. Changes nothing, so it takes no fence: extra machines it sees
    /// are left to ensure, resize and the engine's orphan sweep (reason `extra`).
    ///
    /// # Errors
    /// Only transport and permission failures; "not found" is `Ok(None)`.
    fn describe_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
    ) -> BoxFuture<'a, Result<Option<InstanceObservation>, AdapterError>>;

    /// [`Compute::describe_instance`] for many launch tokens at once: one answer per token, in
    /// the order of `tokens`, each what `describe_instance` would answer for it alone. A
    /// provider that can describe many machines in one call (EC2: a filter on the token tag)
    /// overrides it so that a drift round costs one call per page instead of one per machine;
    /// the default asks one token at a time.
    ///
    /// # Errors
    /// As [`Compute::describe_instance`]; an error answers for every token.
    fn describe_instances<'a>(
        &'a self,
        tokens: &'a [IdempotencyToken],
    ) -> BoxFuture<'a, Result<Vec<Option<InstanceObservation>>, AdapterError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(tokens.len());
            for token in tokens {
                out.push(self.describe_instance(token).await?);
            }
            Ok(out)
        })
    }

    /// Gives the machine launched with `token` the size `request` asks for, grows its data
    /// volume to `request.data_volume_gb` when that is larger, and leaves the machine running.
    ///
    /// Called by the update workflow's resize unit on every run and retry, with the token that
    /// *launched* the machine (recorded on the resource), not the unit's own token.
    ///
    /// - **Idempotent by target state.** It observes first; a machine that already has the
    ///   wanted size and runs is left alone (a no-op costs one describe). Otherwise it does only
    ///   the steps still missing (EC2: stop, change the type while stopped, start).
    /// - **Re-entrant.** Each step is chosen from what it observes, never from what an earlier
    ///   attempt meant to do, so a retry after a crash at any point (stopping, stopped with
    ///   the old size, stopped with the new size, starting) converges.
    /// - **Touches one machine.** It may stop, resize and start only the live managed machine
    ///   launched with `token`, and grow only that machine's data volume; it never launches
    ///   anything, and terminates only extra machines carrying `token` (the same repair as
    ///   [`Compute::ensure_instance`], after checking `fence`).
    /// - **Volumes only grow.** The data volume is observed first: at the wanted size (or being
    ///   given it) nothing is sent; larger than wanted is refused before anything changes.
    /// - **Bounded.** It returns no later than `deadline` (plus one provider call) with what it
    ///   sees. The result is [`InstanceState::Running`] only once the machine runs with the
    ///   wanted size; any other state means the resize is under way and the caller should call
    ///   again later (the engine: a transient error with a `retry_after`).
    ///
    /// The machine is unavailable while it is stopped: callers resize only when the size
    /// changes or a machine was left stopped.
    ///
    /// # Errors
    /// Permanent with code [`CODE_MACHINE_NOT_FOUND`] when no live managed machine carries
    /// `token` (terminated outside setpoint: the resync heals it); permanent with
    /// [`CODE_VOLUME_SHRINK`] for a data volume smaller than the machine's; permanent for a size
    /// the provider does not offer or no permission; [`AdapterError::waiting`] when the provider
    /// allows no change of the volume yet (EBS: a limit on modifications per volume, or the
    /// previous one still under way); transient for throttling, capacity (the new size may be
    /// unavailable in the zone), a state that forbids a step right now, timeouts, 5xx and
    /// connection failures.
    fn resize_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a ResizeRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>>;

    /// Terminates the machines `request` names; already gone is success.
    ///
    /// Called by the delete workflow's `terminate-instance` unit with that unit's `token` (for
    /// logs and providers that take one). May terminate only managed machines the request
    /// names; changes nothing else. Does not wait for `terminated`.
    ///
    /// # Errors
    /// Transient for transport failures; permanent for an empty request or no permission.
    fn terminate_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a TerminateRequest,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<TerminateOutcome, AdapterError>>;

    /// One page of the live machines the provider manages (EC2: tagged `setpoint:managed=true`,
    /// not shutting down or terminated), optionally only those of one resource.
    ///
    /// Read-only: it changes nothing, takes no token and needs no fence. The engine calls it
    /// (a) before launching for a resource that records no machine, to adopt or terminate one
    /// tagged with the resource, and (b) in a periodic sweep that reports managed machines
    /// belonging to no live resource. Callers page until `next_page_token` is `None`; a page may
    /// hold fewer machines than asked, even none, without being the last. A listing is a
    /// snapshot per page: a machine launched or terminated while paging may be missed or seen.
    ///
    /// # Errors
    /// Transient for throttling, timeouts, 5xx and connection failures; permanent for no
    /// permission or a page token the provider does not accept.
    fn list_managed_machines<'a>(
        &'a self,
        request: &'a ListMachinesRequest,
    ) -> BoxFuture<'a, Result<MachinePage, AdapterError>>;
}

impl<C: Compute + ?Sized> Compute for Arc<C> {
    fn ensure_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a InstanceRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        (**self).ensure_instance(token, request, deadline, fence)
    }

    fn describe_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
    ) -> BoxFuture<'a, Result<Option<InstanceObservation>, AdapterError>> {
        (**self).describe_instance(token)
    }

    fn describe_instances<'a>(
        &'a self,
        tokens: &'a [IdempotencyToken],
    ) -> BoxFuture<'a, Result<Vec<Option<InstanceObservation>>, AdapterError>> {
        (**self).describe_instances(tokens)
    }

    fn resize_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a ResizeRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        (**self).resize_instance(token, request, deadline, fence)
    }

    fn terminate_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a TerminateRequest,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<TerminateOutcome, AdapterError>> {
        (**self).terminate_instance(token, request, fence)
    }

    fn list_managed_machines<'a>(
        &'a self,
        request: &'a ListMachinesRequest,
    ) -> BoxFuture<'a, Result<MachinePage, AdapterError>> {
        (**self).list_managed_machines(request)
    }
}

/// A [`Compute`] that makes nothing: ensure reports a running machine `i-nop-<token>`, describe
/// finds nothing, resize reports `i-nop-<token>` running with the asked size (the request's
/// `instance_type`, or none when only a plan is given), terminate reports everything as already
/// gone, the listing is empty. For engine tests that do not exercise compute.
#[derive(Debug, Clone, Copy, Default)]
pub struct NopCompute;

impl NopCompute {
    /// The running machine this double reports for `token`.
    fn machine(
        token: &IdempotencyToken,
        instance_type: Option<String>,
        adopted: bool,
    ) -> InstanceObservation {
        InstanceObservation {
            instance_id: format!("i-nop-{token}"),
            state: InstanceState::Running,
            private_ip: None,
            availability_zone: None,
            subnet_id: None,
            instance_type,
            data_volume: None,
            adopted,
        }
    }
}

impl Compute for NopCompute {
    fn ensure_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        _request: &'a InstanceRequest,
        _deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(NopCompute::machine(token, None, false))
        })
    }

    fn describe_instance<'a>(
        &'a self,
        _token: &'a IdempotencyToken,
    ) -> BoxFuture<'a, Result<Option<InstanceObservation>, AdapterError>> {
        Box::pin(async { Ok(None) })
    }

    fn resize_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a ResizeRequest,
        _deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(NopCompute::machine(
                token,
                request.instance_type.clone(),
                true,
            ))
        })
    }

    fn terminate_instance<'a>(
        &'a self,
        _token: &'a IdempotencyToken,
        request: &'a TerminateRequest,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<TerminateOutcome, AdapterError>> {
        Box::pin(async move {
            fence.check()?;
            Ok(TerminateOutcome {
                terminated: Vec::new(),
                already_gone: request.instance_id.iter().cloned().collect(),
            })
        })
    }

    fn list_managed_machines<'a>(
        &'a self,
        _request: &'a ListMachinesRequest,
    ) -> BoxFuture<'a, Result<MachinePage, AdapterError>> {
        Box::pin(async { Ok(MachinePage::default()) })
    }
}

type EnsureFn = dyn Fn(&IdempotencyToken, &InstanceRequest) -> Result<InstanceObservation, AdapterError>
    + Send
    + Sync;
type DescribeFn =
    dyn Fn(&IdempotencyToken) -> Result<Option<InstanceObservation>, AdapterError> + Send + Sync;
type ResizeFn = dyn Fn(&IdempotencyToken, &ResizeRequest) -> Result<InstanceObservation, AdapterError>
    + Send
    + Sync;
type TerminateFn = dyn Fn(&IdempotencyToken, &TerminateRequest) -> Result<TerminateOutcome, AdapterError>
    + Send
    + Sync;
type ListFn = dyn Fn(&ListMachinesRequest) -> Result<MachinePage, AdapterError> + Send + Sync;

/// A [`Compute`] made of closures, for tests: each method calls its closure, or behaves like
/// [`NopCompute`] when none is set. The closures are synchronous; keep state in an `Arc<Mutex>`
/// to count calls or simulate a provider.
#[derive(Clone, Default)]
pub struct ComputeFns {
    ensure: Option<Arc<EnsureFn>>,
    describe: Option<Arc<DescribeFn>>,
    resize: Option<Arc<ResizeFn>>,
    terminate: Option<Arc<TerminateFn>>,
    list: Option<Arc<ListFn>>,
}

impl ComputeFns {
    /// A double that behaves like [`NopCompute`] until closures are set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets what [`Compute::ensure_instance`] does.
    pub fn on_ensure(
        mut self,
        f: impl Fn(&IdempotencyToken, &InstanceRequest) -> Result<InstanceObservation, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.ensure = Some(Arc::new(f));
        self
    }

    /// Sets what [`Compute::describe_instance`] does.
    pub fn on_describe(
        mut self,
        f: impl Fn(&IdempotencyToken) -> Result<Option<InstanceObservation>, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.describe = Some(Arc::new(f));
        self
    }

    /// Sets what [`Compute::resize_instance`] does. A closure that simulates a provider should
    /// keep the trait's rules: change nothing when the machine already has the wanted size and
    /// runs, and fail with [`CODE_MACHINE_NOT_FOUND`] for a token that launched nothing.
    pub fn on_resize(
        mut self,
        f: impl Fn(&IdempotencyToken, &ResizeRequest) -> Result<InstanceObservation, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.resize = Some(Arc::new(f));
        self
    }

    /// Sets what [`Compute::terminate_instance`] does.
    pub fn on_terminate(
        mut self,
        f: impl Fn(&IdempotencyToken, &TerminateRequest) -> Result<TerminateOutcome, AdapterError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.terminate = Some(Arc::new(f));
        self
    }

    /// Sets what [`Compute::list_managed_machines`] does. A closure that simulates a provider
    /// should page with `page_token`/`page_size` and list only live machines.
    pub fn on_list(
        mut self,
        f: impl Fn(&ListMachinesRequest) -> Result<MachinePage, AdapterError> + Send + Sync + 'static,
    ) -> Self {
        self.list = Some(Arc::new(f));
        self
    }
}

impl fmt::Debug for ComputeFns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComputeFns")
            .field("ensure", &self.ensure.is_some())
            .field("describe", &self.describe.is_some())
            .field("resize", &self.resize.is_some())
            .field("terminate", &self.terminate.is_some())
            .field("list", &self.list.is_some())
            .finish()
    }
}

impl Compute for ComputeFns {
    fn ensure_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a InstanceRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        match &self.ensure {
            Some(f) => Box::pin(std::future::ready(
                fence.check().and_then(|()| f(token, request)),
            )),
            None => NopCompute.ensure_instance(token, request, deadline, fence),
        }
    }

    fn describe_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
    ) -> BoxFuture<'a, Result<Option<InstanceObservation>, AdapterError>> {
        match &self.describe {
            Some(f) => Box::pin(std::future::ready(f(token))),
            None => NopCompute.describe_instance(token),
        }
    }

    fn resize_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a ResizeRequest,
        deadline: Instant,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<InstanceObservation, AdapterError>> {
        match &self.resize {
            Some(f) => Box::pin(std::future::ready(
                fence.check().and_then(|()| f(token, request)),
            )),
            None => NopCompute.resize_instance(token, request, deadline, fence),
        }
    }

    fn terminate_instance<'a>(
        &'a self,
        token: &'a IdempotencyToken,
        request: &'a TerminateRequest,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<TerminateOutcome, AdapterError>> {
        match &self.terminate {
            Some(f) => Box::pin(std::future::ready(
                fence.check().and_then(|()| f(token, request)),
            )),
            None => NopCompute.terminate_instance(token, request, fence),
        }
    }

    fn list_managed_machines<'a>(
        &'a self,
        request: &'a ListMachinesRequest,
    ) -> BoxFuture<'a, Result<MachinePage, AdapterError>> {
        match &self.list {
            Some(f) => Box::pin(std::future::ready(f(request))),
            None => NopCompute.list_managed_machines(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::error::ErrorClass;

    fn request() -> InstanceRequest {
        InstanceRequest {
            resource_id: Uuid::nil(),
            tenant: "acme".into(),
            plan: "kvx.small".into(),
            name: None,
            image_id: None,
            instance_type: None,
            subnet_id: None,
            data_volume_gb: None,
        }
    }

    #[test]
    fn the_trait_is_object_safe_and_arc_forwards() {
        let c: Arc<dyn Compute> = Arc::new(NopCompute);
        let _also: Box<dyn Compute> = Box::new(c);
    }

    #[test]
    fn state_names_round_trip() {
        for s in [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::Stopping,
            InstanceState::Stopped,
            InstanceState::ShuttingDown,
            InstanceState::Terminated,
            InstanceState::Unknown,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert!(InstanceState::ShuttingDown.is_gone());
        assert!(!InstanceState::Stopped.is_gone());
        assert_eq!(InstanceState::parse("rebooting"), InstanceState::Unknown);
    }

    #[test]
    fn request_deserializes_with_optional_fields_absent() {
        let r: InstanceRequest = serde_json::from_value(serde_json::json!({
            "resource_id": Uuid::nil(), "tenant": "acme", "plan": "kvx.small"
        }))
        .unwrap();
        assert_eq!(r, request());
        assert!(TerminateRequest::default().is_empty());
    }

    #[tokio::test]
    async fn fns_double_simulates_an_idempotent_provider() {
        let made: Arc<Mutex<HashMap<IdempotencyToken, String>>> = Arc::default();
        let m = made.clone();
        let compute = ComputeFns::new().on_ensure(move |token, _req| {
            let mut made = m.lock().unwrap();
            let n = made.len();
            let (adopted, id) = match made.get(token) {
                Some(id) => (true, id.clone()),
                None => (
                    false,
                    made.entry(token.clone())
                        .or_insert(format!("i-{n}"))
                        .clone(),
                ),
            };
            Ok(InstanceObservation {
                instance_id: id,
                state: InstanceState::Running,
                private_ip: None,
                availability_zone: None,
                subnet_id: None,
                instance_type: None,
                data_volume: None,
                adopted,
            })
        });
        let token = IdempotencyToken::parse("t-1").unwrap();
        let first = compute
            .ensure_instance(&token, &request(), Instant::now(), &Fence::unbounded())
            .await
            .unwrap();
        let second = compute
            .ensure_instance(&token, &request(), Instant::now(), &Fence::unbounded())
            .await
            .unwrap();
        assert_eq!(first.instance_id, second.instance_id);
        assert!(!first.adopted && second.adopted);
        assert_eq!(made.lock().unwrap().len(), 1);
        assert_eq!(compute.describe_instance(&token).await.unwrap(), None);
    }

    /// A provider simulated with the double, keeping the resize rules: observe first, change
    /// nothing at the target state, only the machine of the token, not-found is permanent.
    #[tokio::test]
    async fn fns_double_simulates_a_resize_idempotent_by_target_state() {
        // token -> (instance type, running); plus a count of changes made.
        type Machines = HashMap<IdempotencyToken, (String, bool)>;
        let machines: Arc<Mutex<Machines>> = Arc::default();
        let changes = Arc::new(Mutex::new(0));
        let (m, c) = (machines.clone(), changes.clone());
        let compute = ComputeFns::new().on_resize(move |token, req| {
            let mut machines = m.lock().unwrap();
            let Some((size, running)) = machines.get_mut(token) else {
                return Err(AdapterError::permanent("no machine").with_code(CODE_MACHINE_NOT_FOUND));
            };
            let wanted = req
                .instance_type
                .clone()
                .unwrap_or_else(|| req.plan.clone());
            if *size != wanted || !*running {
                *size = wanted;
                *running = true;
                *c.lock().unwrap() += 1;
            }
            Ok(InstanceObservation {
                instance_id: format!("i-{token}"),
                state: InstanceState::Running,
                private_ip: None,
                availability_zone: None,
                subnet_id: None,
                instance_type: Some(size.clone()),
                data_volume: None,
                adopted: true,
            })
        });
        let token = IdempotencyToken::parse("launch-1").unwrap();
        machines
            .lock()
            .unwrap()
            .insert(token.clone(), ("t3.small".into(), true));
        let req = ResizeRequest {
            resource_id: Uuid::nil(),
            plan: "kvx.medium".into(),
            instance_type: Some("t3.medium".into()),
            data_volume_gb: None,
        };
        for _ in 0..2 {
            let seen = compute
                .resize_instance(&token, &req, Instant::now(), &Fence::unbounded())
                .await
                .unwrap();
            assert_eq!(seen.state, InstanceState::Running);
            assert_eq!(seen.instance_type.as_deref(), Some("t3.medium"));
        }
        assert_eq!(
            *changes.lock().unwrap(),
            1,
            "the second call changed nothing"
        );

        let other = IdempotencyToken::parse("launch-2").unwrap();
        let e = compute
            .resize_instance(&other, &req, Instant::now(), &Fence::unbounded())
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.code.as_deref(), Some(CODE_MACHINE_NOT_FOUND));
        assert_eq!(machines.lock().unwrap().len(), 1, "nothing launched");

        // Without a closure the double behaves like NopCompute: running, at the asked size.
        let nop = ComputeFns::new()
            .resize_instance(&token, &req, Instant::now(), &Fence::unbounded())
            .await
            .unwrap();
        assert_eq!(nop.instance_id, "i-nop-launch-1");
        assert_eq!(nop.instance_type.as_deref(), Some("t3.medium"));
    }

    #[test]
    fn a_volume_being_grown_counts_at_its_target_size_unless_that_failed() {
        let mut v = DataVolume {
            volume_id: "vol-1".into(),
            size_gb: 20,
            modification: None,
        };
        assert_eq!(v.effective_size_gb(), 20);
        for (state, effective) in [
            (VolumeModificationState::Modifying, 40),
            (VolumeModificationState::Optimizing, 40),
            (VolumeModificationState::Completed, 40),
            (VolumeModificationState::Unknown, 40),
            (VolumeModificationState::Failed, 20),
        ] {
            v.modification = Some(VolumeModification {
                state,
                target_size_gb: Some(40),
                started_at: None,
            });
            assert_eq!(v.effective_size_gb(), effective, "{state}");
            assert_eq!(VolumeModificationState::parse(state.as_str()), state);
        }
        // A modification of the type only (no target size) leaves the size as reported.
        v.modification = Some(VolumeModification {
            state: VolumeModificationState::Modifying,
            target_size_gb: None,
            started_at: None,
        });
        assert_eq!(v.effective_size_gb(), 20);
        let r: ResizeRequest = serde_json::from_value(serde_json::json!({
            "resource_id": Uuid::nil(), "plan": "kvx.small"
        }))
        .unwrap();
        assert_eq!(r.data_volume_gb, None);
    }

    /// A provider's listing simulated with the double: pages of `page_size` over live machines,
    /// filtered by resource; the Nop double lists nothing.
    #[tokio::test]
    async fn fns_double_pages_a_listing_and_nop_lists_nothing() {
        let resource = Uuid::from_u128(7);
        let machines: Vec<ManagedMachine> = (0..5)
            .map(|i| ManagedMachine {
                instance_id: format!("i-{i}"),
                state: if i == 2 {
                    InstanceState::Stopped
                } else {
                    InstanceState::Running
                },
                resource_id: Some(if i < 3 { resource } else { Uuid::nil() }),
                launch_token: IdempotencyToken::parse(format!("t-{i}")).ok(),
                tenant: Some("acme".into()),
                launch_time: Some(SystemTime::UNIX_EPOCH),
            })
            .collect();
        let compute = ComputeFns::new().on_list(move |req| {
            let all: Vec<&ManagedMachine> = machines
                .iter()
                .filter(|m| req.resource_id.is_none() || m.resource_id == req.resource_id)
                .collect();
            let start: usize = req.page_token.as_deref().map_or(0, |t| t.parse().unwrap());
            let size = req.page_size.unwrap_or(100) as usize;
            let end = (start + size).min(all.len());
            Ok(MachinePage {
                machines: all[start..end].iter().map(|m| (*m).clone()).collect(),
                next_page_token: (end < all.len()).then(|| end.to_string()),
            })
        });
        let mut req = ListMachinesRequest {
            resource_id: Some(resource),
            page_token: None,
            page_size: Some(2),
        };
        let mut seen = Vec::new();
        loop {
            let page = compute.list_managed_machines(&req).await.unwrap();
            seen.extend(page.machines.into_iter().map(|m| m.instance_id));
            match page.next_page_token {
                Some(t) => req.page_token = Some(t),
                None => break,
            }
        }
        assert_eq!(seen, ["i-0", "i-1", "i-2"]);
        let none = NopCompute
            .list_managed_machines(&ListMachinesRequest::default())
            .await
            .unwrap();
        assert_eq!(none, MachinePage::default());
        let arc: Arc<dyn Compute> = Arc::new(ComputeFns::new());
        assert!(
            arc.list_managed_machines(&ListMachinesRequest::default())
                .await
                .unwrap()
                .machines
                .is_empty()
        );
    }
}
