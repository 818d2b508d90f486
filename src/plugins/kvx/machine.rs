//! The machine steps of the KVX kind: launch (create, heal), resize (update), terminate
//! (delete), and the drift check (observe).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use setpoint_adapter::{
    AdapterError, BatchStep, BoxFuture, CODE_MACHINE_NOT_FOUND, CODE_NO_DATA_VOLUME, Compute,
    ConditionStatus, DataVolume, IdempotencyToken, InstanceObservation, InstanceRequest,
    InstanceState, ListMachinesRequest, ResizeRequest, Step, StepInput, StepResult,
    TerminateRequest, Then, WorkContext,
};

use super::{DriftAction, Kvx, KvxSpec, MACHINE_AVAILABLE, READY, call};

/// How soon a unit whose machine is not running yet is retried.
pub(super) const NOT_RUNNING_RETRY: Duration = Duration::from_secs(2);

/// What the engine knows about an instance's machine: the `machine` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// The provider's id (`i-…`).
    pub instance_id: String,
    /// Its private IP.
    #[serde(default)]
    pub private_ip: Option<String>,
    /// Its availability zone.
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// The token that launched it (to find it again).
    pub launch_token: String,
    /// Its state when last seen.
    #[serde(default)]
    pub state: String,
    /// Its size (EC2 instance type) when last seen.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// The region it runs in. Absent on machines recorded by engines of the previous release,
    /// which ran one region: the engine's default region.
    #[serde(default)]
    pub region: Option<String>,
    /// Its data volume, when last seen.
    #[serde(default)]
    pub data_volume: Option<DataVolume>,
}

impl Machine {
    fn launched(seen: InstanceObservation, token: &IdempotencyToken, region: &str) -> Self {
        Self {
            instance_id: seen.instance_id,
            private_ip: seen.private_ip,
            availability_zone: seen.availability_zone,
            launch_token: token.to_string(),
            state: seen.state.to_string(),
            instance_type: seen.instance_type,
            region: Some(region.to_owned()),
            data_volume: seen.data_volume,
        }
    }

    /// This machine as `seen` now: what the provider reported replaces what was known, and
    /// what it left out stays.
    pub fn seen(self, seen: InstanceObservation) -> Machine {
        Machine {
            instance_id: seen.instance_id,
            private_ip: seen.private_ip.or(self.private_ip),
            availability_zone: seen.availability_zone.or(self.availability_zone),
            launch_token: self.launch_token,
            state: seen.state.to_string(),
            instance_type: seen.instance_type.or(self.instance_type),
            region: self.region,
            data_volume: seen.data_volume.or(self.data_volume),
        }
    }

    fn token(&self) -> Result<IdempotencyToken, AdapterError> {
        IdempotencyToken::parse(self.launch_token.clone()).map_err(|e| {
            AdapterError::permanent(format!("the recorded launch token is invalid: {e}"))
                .with_code("invalid-spec")
        })
    }
}

/// Which chain a machine step runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Create: launch with this unit's token.
    Create,
    /// Update: resize the recorded machine (or launch one if none is left).
    Update,
    /// Heal: launch a replacement with this unit's token.
    Heal,
    /// Delete: terminate every machine of the instance.
    Delete,
    /// Observe: the drift check.
    Observe,
}

/// A machine step.
pub(super) struct MachineStep {
    pub kvx: Arc<Kvx>,
    pub mode: Mode,
}

impl Step for MachineStep {
    fn run<'a>(
        &'a self,
        ctx: &'a WorkContext,
        input: &'a StepInput,
    ) -> BoxFuture<'a, Result<StepResult, AdapterError>> {
        Box::pin(async move {
            let spec: KvxSpec = input.spec()?;
            let machine: Option<Machine> = input.output("machine");
            match self.mode {
                Mode::Create => self.ensure(ctx, input, &spec, None).await,
                Mode::Heal => self.ensure(ctx, input, &spec, machine).await,
                Mode::Update => self.resize(ctx, input, &spec, machine).await,
                Mode::Delete => self.terminate(ctx, input, &spec, machine).await,
                Mode::Observe => self.observe(ctx, input, &spec, machine).await,
            }
        })
    }
}

impl MachineStep {
    /// The region a machine lives in: its own when recorded, else the spec's (a new launch),
    /// else, for a machine an engine of the previous release launched, where it is found.
    async fn region_of(
        &self,
        ctx: &WorkContext,
        spec: &KvxSpec,
        machine: Option<&Machine>,
    ) -> Result<String, AdapterError> {
        match machine {
            Some(m) => match &m.region {
                Some(region) => Ok(region.clone()),
                None => self.locate_unrecorded(ctx, m).await,
            },
            None => Ok(spec.region.clone()),
        }
    }

    /// The region of a machine recorded by an engine of the previous release, which ran one
    /// region and did not record it (nor honour the spec's region): the served region where a
    /// machine with its launch token is found, the default region first; the default region
    /// when none is found (it is gone). Not simply the default region: an upgrade that adds a
    /// region may make another one the default (`[ec2.regions.*]` are taken in name order),
    /// and the machine would be looked for where it is not — relaunched on update, left
    /// running on delete. Once a step records the region, this lookup is not made again.
    async fn locate_unrecorded(
        &self,
        ctx: &WorkContext,
        machine: &Machine,
    ) -> Result<String, AdapterError> {
        let default = self.kvx.default_region.as_str();
        let Ok(token) = machine.token() else {
            return Ok(default.to_owned());
        };
        let regions = std::iter::once(default)
            .chain(self.kvx.computes.keys().map(String::as_str))
            .filter(|r| self.kvx.serves(r));
        let mut tried = Vec::new();
        for region in regions {
            if tried.contains(&region) {
                continue;
            }
            tried.push(region);
            let compute = self.kvx.compute(region)?;
            let seen = call(
                ctx,
                &token,
                "compute",
                "describe_instance",
                compute.describe_instance(&token),
            )
            .await?;
            if seen.is_some() {
                if region != default {
                    tracing::info!(work_id = ctx.work_id, machine = %machine.instance_id, region,
                        "a machine recorded without its region runs outside the default region");
                }
                return Ok(region.to_owned());
            }
        }
        Ok(default.to_owned())
    }

    /// Launches (or adopts) the instance's machine with this unit's token, after dealing with
    /// machines tagged with the resource that the record does not know (a launch an operator
    /// gave up on, or a database restored from before it): a running one is adopted, others
    /// are terminated. Waits for it to run.
    async fn ensure(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        spec: &KvxSpec,
        lost: Option<Machine>,
    ) -> Result<StepResult, AdapterError> {
        let region = spec.region.clone();
        let compute = self.kvx.compute(&region)?;
        if self.mode != Mode::Create
            && let Some(adopted) = self
                .adopt_or_clear(ctx, input, &region, lost.as_ref())
                .await?
        {
            return Ok(running(adopted, self.mode, input));
        }
        let request = InstanceRequest {
            resource_id: input.resource.id,
            tenant: input.resource.tenant.clone(),
            plan: spec.plan.clone(),
            name: Some(format!(
                "kvx-{}-{}",
                input.resource.tenant, input.resource.name
            )),
            image_id: None,
            instance_type: None,
            subnet_id: None,
            data_volume_gb: u32::try_from(spec.size_gb).ok(),
        };
        let deadline = ctx
            .deadline
            .min(Instant::now() + self.kvx.config.machine_wait);
        let seen = call(
            ctx,
            &ctx.token,
            "compute",
            "ensure_instance",
            compute.ensure_instance(&ctx.token, &request, deadline, &ctx.fence),
        )
        .await?;
        if seen.state != InstanceState::Running || seen.private_ip.is_none() {
            // The same token adopts the same machine on the retry.
            return Err(AdapterError::transient(format!(
                "machine {} is {} (private IP {}); checking again shortly",
                seen.instance_id,
                seen.state,
                seen.private_ip.as_deref().unwrap_or("not yet assigned")
            ))
            .with_code("machine-not-running")
            .with_retry_after(NOT_RUNNING_RETRY));
        }
        Ok(running(
            Machine::launched(seen, &ctx.token, &region),
            self.mode,
            input,
        ))
    }

    /// Before a launch where the record knows no running machine: adopts a running machine
    /// tagged with the resource (it holds the instance's data), terminates the others.
    async fn adopt_or_clear(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        region: &str,
        lost: Option<&Machine>,
    ) -> Result<Option<Machine>, AdapterError> {
        let compute = self.kvx.compute(region)?;
        let mut request = ListMachinesRequest {
            resource_id: Some(input.resource.id),
            ..ListMachinesRequest::default()
        };
        let mut found = Vec::new();
        loop {
            let page = call(
                ctx,
                &ctx.token,
                "compute",
                "list_managed_machines",
                compute.list_managed_machines(&request),
            )
            .await?;
            found.extend(page.machines);
            match page.next_page_token {
                Some(t) => request.page_token = Some(t),
                None => break,
            }
        }
        let lost_id = lost.map(|m| m.instance_id.as_str());
        let mut adopt = None;
        let mut strays = Vec::new();
        for m in found {
            if Some(m.instance_id.as_str()) == lost_id || m.state.is_gone() {
                continue;
            }
            match (&adopt, m.state, &m.launch_token) {
                (None, InstanceState::Running | InstanceState::Pending, Some(token)) => {
                    adopt = Some((m.instance_id.clone(), token.clone()));
                }
                _ => strays.push(m.instance_id.clone()),
            }
        }
        if !strays.is_empty() {
            tracing::warn!(work_id = ctx.work_id, token = %ctx.token, resource = %input.resource.id,
                machines = ?strays, "terminating machines of the instance that its record does not know");
            for id in &strays {
                call(
                    ctx,
                    &ctx.token,
                    "compute",
                    "terminate_instance",
                    compute.terminate_instance(
                        &ctx.token,
                        &TerminateRequest {
                            instance_id: Some(id.clone()),
                            resource_id: None,
                            launch_token: None,
                        },
                        &ctx.fence,
                    ),
                )
                .await?;
            }
        }
        let Some((id, token)) = adopt else {
            return Ok(None);
        };
        tracing::warn!(work_id = ctx.work_id, token = %ctx.token, resource = %input.resource.id,
            machine = %id, "adopting a machine of the instance that its record does not know");
        let seen = call(
            ctx,
            &token,
            "compute",
            "describe_instance",
            compute.describe_instance(&token),
        )
        .await?;
        match seen {
            Some(seen) if seen.state == InstanceState::Running && seen.private_ip.is_some() => {
                Ok(Some(Machine::launched(seen, &token, region)))
            }
            Some(seen) => Err(AdapterError::transient(format!(
                "adopting machine {} of the instance, which is {}; checking again shortly",
                seen.instance_id, seen.state
            ))
            .with_code("machine-not-running")
            .with_retry_after(NOT_RUNNING_RETRY)),
            None => Ok(None),
        }
    }

    /// Gives the recorded machine the plan's size and the spec's data volume, launching one of
    /// the new plan when none is left.
    async fn resize(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        spec: &KvxSpec,
        machine: Option<Machine>,
    ) -> Result<StepResult, AdapterError> {
        let Some(machine) =
            machine.filter(|m| !m.instance_id.is_empty() && m.state != "terminated")
        else {
            tracing::info!(work_id = ctx.work_id, token = %ctx.token, resource = %input.resource.id,
                "update: no machine recorded; launching one");
            return self.ensure(ctx, input, spec, None).await;
        };
        let region = self.region_of(ctx, spec, Some(&machine)).await?;
        let compute = self.kvx.compute(&region)?;
        // The machine is found by the token that launched it, never by this unit's token.
        let launch_token = machine.token()?;
        let mut request = ResizeRequest {
            resource_id: input.resource.id,
            plan: spec.plan.clone(),
            instance_type: None,
            data_volume_gb: u32::try_from(spec.size_gb).ok(),
        };
        let deadline = ctx
            .deadline
            .min(Instant::now() + self.kvx.config.machine_wait);
        let mut no_volume = false;
        let seen = loop {
            match call(
                ctx,
                &launch_token,
                "compute",
                "resize_instance",
                compute.resize_instance(&launch_token, &request, deadline, &ctx.fence),
            )
            .await
            {
                Ok(seen) => break seen,
                Err(e) if e.code.as_deref() == Some(CODE_MACHINE_NOT_FOUND) => {
                    // Terminated outside setpoint: the update still wants a machine of the new
                    // plan; it launches one with its own token (a retry adopts it).
                    tracing::warn!(work_id = ctx.work_id, token = %ctx.token, machine = %machine.instance_id,
                        "update: the machine is gone; launching a new one");
                    return self.ensure(ctx, input, spec, Some(machine)).await;
                }
                Err(e)
                    if e.code.as_deref() == Some(CODE_NO_DATA_VOLUME)
                        && request.data_volume_gb.is_some() =>
                {
                    // A machine launched before machines had a data volume (by the previous
                    // release): the plan still applies; the size cannot, and says so below.
                    tracing::warn!(work_id = ctx.work_id, token = %ctx.token, machine = %machine.instance_id,
                        "update: the machine has no data volume; resizing it without one");
                    request.data_volume_gb = None;
                    no_volume = true;
                }
                Err(e) => return Err(e),
            }
        };
        if seen.state != InstanceState::Running || seen.private_ip.is_none() {
            return Err(AdapterError::transient(format!(
                "machine {} is {} while being resized to plan {}; checking again shortly",
                seen.instance_id, seen.state, spec.plan
            ))
            .with_code("machine-resizing")
            .with_retry_after(NOT_RUNNING_RETRY));
        }
        let resized =
            machine.instance_type.is_some() && seen.instance_type != machine.instance_type;
        let size = seen
            .instance_type
            .clone()
            .unwrap_or_else(|| "its size".into());
        let from = machine.instance_type.clone().unwrap_or_else(|| "?".into());
        let machine = Machine {
            region: Some(region),
            ..machine.seen(seen)
        };
        let volume = match &machine.data_volume {
            Some(v) => format!(", data volume {} GiB", v.effective_size_gb()),
            None if no_volume => format!(
                "; it has no data volume (launched before setpoint gave machines one), so \
                 size_gb {} is not applied: replace the machine to have one",
                spec.size_gb
            ),
            None => String::new(),
        };
        let reason = match (no_volume, resized) {
            (true, _) => "NoDataVolume",
            (false, true) => "Resized",
            (false, false) => "MachineRunning",
        };
        Ok(StepResult::next()
            .output(json!(machine))
            .condition(
                MACHINE_AVAILABLE,
                ConditionStatus::True,
                reason,
                if resized {
                    format!(
                        "machine {} was resized from {from} to {size} for plan {}{volume}",
                        machine.instance_id, spec.plan
                    )
                } else {
                    format!(
                        "machine {} runs as {size} for plan {}{volume}",
                        machine.instance_id, spec.plan
                    )
                },
            )
            .condition(
                READY,
                ConditionStatus::False,
                "Updating",
                "configuring the Kubernetes objects",
            ))
    }

    /// Terminates every machine of the instance: the recorded one by its id and launch token,
    /// and any other by the resource tag.
    async fn terminate(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        spec: &KvxSpec,
        machine: Option<Machine>,
    ) -> Result<StepResult, AdapterError> {
        let region = self.region_of(ctx, spec, machine.as_ref()).await?;
        let compute = self.kvx.compute(&region)?;
        let request = TerminateRequest {
            instance_id: machine
                .as_ref()
                .map(|m| m.instance_id.clone())
                .filter(|id| !id.is_empty()),
            resource_id: Some(input.resource.id),
            launch_token: machine
                .as_ref()
                .and_then(|m| IdempotencyToken::parse(m.launch_token.clone()).ok()),
        };
        let done = call(
            ctx,
            &ctx.token,
            "compute",
            "terminate_instance",
            compute.terminate_instance(&ctx.token, &request, &ctx.fence),
        )
        .await?;
        Ok(StepResult::next()
            .output(json!({
                "instance_id": request.instance_id,
                "launch_token": machine.as_ref().map(|m| m.launch_token.clone()),
                "region": region,
                "state": "terminated",
                "terminated": done.terminated,
            }))
            .condition(
                MACHINE_AVAILABLE,
                ConditionStatus::False,
                "Terminated",
                format!(
                    "{} machine(s) terminated, {} already gone",
                    done.terminated.len(),
                    done.already_gone.len()
                ),
            )
            .condition(
                READY,
                ConditionStatus::False,
                "Deleting",
                "the machine is terminated",
            ))
    }

    /// Checks the machine: running, it refreshes what is known; gone, the instance is healed
    /// (the `heal` chain) or marked, per the drift action.
    async fn observe(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        spec: &KvxSpec,
        machine: Option<Machine>,
    ) -> Result<StepResult, AdapterError> {
        let Some(machine) = machine.filter(|m| !m.instance_id.is_empty()) else {
            return Ok(StepResult::next());
        };
        let region = self.region_of(ctx, spec, Some(&machine)).await?;
        let compute = self.kvx.compute(&region)?;
        let token = machine.token()?;
        let seen = call(
            ctx,
            &token,
            "compute",
            "describe_instance",
            compute.describe_instance(&token),
        )
        .await?;
        Ok(self.observed(ctx, input, machine, region, seen))
    }

    /// What a drift check records for `machine` (in `region`) given what the provider `seen`.
    fn observed(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
        machine: Machine,
        region: String,
        seen: Option<InstanceObservation>,
    ) -> StepResult {
        match seen {
            Some(seen) if !seen.state.is_gone() => {
                let state = seen.state;
                let available = state == InstanceState::Running;
                let machine = Machine {
                    region: Some(region),
                    ..machine.seen(seen)
                };
                StepResult::next().output(json!(machine)).condition(
                    MACHINE_AVAILABLE,
                    if available {
                        ConditionStatus::True
                    } else {
                        ConditionStatus::False
                    },
                    if available {
                        "MachineRunning"
                    } else {
                        "MachineNotRunning"
                    },
                    format!("machine {} is {state}", machine.instance_id),
                )
            }
            _ => {
                tracing::warn!(work_id = ctx.work_id, token = %ctx.token, resource = %input.resource.id,
                    machine = %machine.instance_id, "drift: the machine was terminated outside setpoint");
                let gone = json!({
                    "instance_id": machine.instance_id,
                    "launch_token": machine.launch_token,
                    "region": region,
                    "state": "terminated",
                });
                let result = StepResult::next().output(gone).condition(
                    MACHINE_AVAILABLE,
                    ConditionStatus::False,
                    "TerminatedOutsideSetpoint",
                    format!(
                        "machine {} was terminated outside setpoint",
                        machine.instance_id
                    ),
                );
                match self.kvx.config.drift {
                    DriftAction::Heal => result
                        .condition(
                            READY,
                            ConditionStatus::False,
                            "Healing",
                            "launching a new machine",
                        )
                        .then(Then::Chain("heal".into())),
                    DriftAction::Mark => result.condition(
                        READY,
                        ConditionStatus::False,
                        "MachineLost",
                        "the machine is gone; delete the instance, or run the engine with drift \
                         action `heal` to replace it",
                    ),
                }
            }
        }
    }
}

/// The KVX drift check in batches: the checks of one region that run together are observed
/// with one [`Compute::describe_instances`] (EC2: one `DescribeInstances` per 200 machines),
/// and each records what a check of its own would have.
pub(super) struct ObserveBatch {
    pub step: MachineStep,
}

/// A check's machine, its region and launch token, once read from its input.
struct Observed {
    machine: Machine,
    region: String,
    token: IdempotencyToken,
}

impl ObserveBatch {
    /// What one item needs before the shared call: `None` for an instance with no machine
    /// recorded (nothing to observe).
    async fn prepare(
        &self,
        ctx: &WorkContext,
        input: &StepInput,
    ) -> Result<Option<Observed>, AdapterError> {
        let spec: KvxSpec = input.spec()?;
        let machine: Option<Machine> = input.output("machine");
        let Some(machine) = machine.filter(|m| !m.instance_id.is_empty()) else {
            return Ok(None);
        };
        let region = self.step.region_of(ctx, &spec, Some(&machine)).await?;
        let token = machine.token()?;
        Ok(Some(Observed {
            machine,
            region,
            token,
        }))
    }
}

impl BatchStep for ObserveBatch {
    fn batch_key(&self, input: &StepInput) -> String {
        // The recorded region, else the spec's; a machine of the previous release whose region
        // is not recorded is looked for in `prepare`, and grouped by what that finds.
        input
            .output::<Machine>("machine")
            .and_then(|m| m.region)
            .or_else(|| input.spec.get("region")?.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn run_batch<'a>(
        &'a self,
        items: &'a [(WorkContext, StepInput)],
    ) -> BoxFuture<'a, Vec<Result<StepResult, AdapterError>>> {
        Box::pin(async move {
            let mut results: Vec<Option<Result<StepResult, AdapterError>>> =
                (0..items.len()).map(|_| None).collect();
            let mut by_region: BTreeMap<String, Vec<(usize, Observed)>> = BTreeMap::new();
            for (n, (ctx, input)) in items.iter().enumerate() {
                match self.prepare(ctx, input).await {
                    Ok(Some(o)) => by_region.entry(o.region.clone()).or_default().push((n, o)),
                    Ok(None) => results[n] = Some(Ok(StepResult::next())),
                    Err(e) => results[n] = Some(Err(e)),
                }
            }
            for (region, group) in by_region {
                let tokens: Vec<IdempotencyToken> =
                    group.iter().map(|(_, o)| o.token.clone()).collect();
                let seen = match self.step.kvx.compute(&region) {
                    Ok(compute) => {
                        // Listed in every unit's history: each check made this call.
                        for (n, o) in &group {
                            items[*n].0.record_call(format!(
                                "compute:describe_instances token={} batch={}",
                                o.token,
                                tokens.len()
                            ));
                        }
                        crate::metrics::adapter_call(
                            "compute",
                            "describe_instances",
                            compute.describe_instances(&tokens),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                match seen {
                    Ok(seen) if seen.len() == group.len() => {
                        for ((n, o), seen) in group.into_iter().zip(seen) {
                            let (ctx, input) = &items[n];
                            results[n] = Some(Ok(self
                                .step
                                .observed(ctx, input, o.machine, o.region, seen)));
                        }
                    }
                    Ok(_) => {
                        for (n, _) in group {
                            results[n] = Some(Err(AdapterError::transient(
                                "the provider answered a different number of machines than \
                                 it was asked for",
                            )));
                        }
                    }
                    Err(e) => {
                        for (n, _) in group {
                            results[n] = Some(Err(e.clone()));
                        }
                    }
                }
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(AdapterError::transient("item left unanswered"))))
                .collect()
        })
    }
}

/// The result of a machine step whose machine runs.
fn running(machine: Machine, mode: Mode, _input: &StepInput) -> StepResult {
    let message = format!(
        "machine {} runs at {}",
        machine.instance_id,
        machine.private_ip.as_deref().unwrap_or("?")
    );
    StepResult::next()
        .output(json!(machine))
        .condition(
            MACHINE_AVAILABLE,
            ConditionStatus::True,
            "MachineRunning",
            message,
        )
        .condition(
            READY,
            ConditionStatus::False,
            match mode {
                Mode::Heal => "Healing",
                Mode::Update => "Updating",
                _ => "Provisioning",
            },
            "configuring the Kubernetes objects",
        )
}
