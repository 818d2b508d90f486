//! [`Route53Dns`]: hosted zones and their records on Amazon Route 53 (or moto).
//!
//! Every call reads before it writes, and every write is preceded by `fence.check()`:
//! - `ensure_zone` finds the zone by `CallerReference == token` (Route 53 cannot filter by it,
//!   so it pages through `ListHostedZones`) and adopts it; only if there is none does it call
//!   `CreateHostedZone` with `CallerReference = token`, then tags the zone. Tags are checked
//!   and completed on adoption too, since a crash can fall between creating and tagging.
//! - `sync_records` reads every record set of the zone and writes only the difference, in
//!   change batches that keep each record with its ownership record (see
//!   [`crate::ownership`] and the private `plan` module).
//! - `delete_zone` deletes our records, then the zone; "already gone" is success.
//! - `observe_zone` only reads.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use aws_sdk_route53::Client;
use aws_sdk_route53::types::{
    ChangeBatch, DelegationSet, HostedZone, HostedZoneConfig, RrType, Tag, TagResourceType,
};
use setpoint_adapter::{
    AdapterError, Budget, BudgetKey, Budgets, Fence, IdempotencyToken, Unlimited,
};
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::classify::{classify, is_no_such_zone};
use setpoint_adapter::aws::LeaveThrottlesToBudget;

/// Crash-test point right after `CreateHostedZone` returned (see [`setpoint_adapter::failpoint`]).
pub const FAILPOINT_AFTER_CREATE_ZONE: &str = "route53.after-create-zone";
use crate::config::{ConfigError, Route53Config};
use crate::observation::{DeleteOutcome, Drift, SyncOutcome, ZoneInfo, ZoneObservation};
use crate::plan::{self, Index, Rrset, build_error};
use crate::spec::{Desired, InvalidSpec, ZoneRef, ZoneRequest};

/// Tag marking zones setpoint manages (value `true`).
pub const TAG_MANAGED: &str = "setpoint:managed";
/// Tag holding the setpoint resource id the zone belongs to.
pub const TAG_RESOURCE: &str = "setpoint:resource";
/// Tag holding the tenant owning the resource.
pub const TAG_TENANT: &str = "setpoint:tenant";
/// Tag holding the token of the unit that created the zone (also its `CallerReference`).
pub const TAG_TOKEN: &str = "setpoint:token";

/// Error code of a spec that fails the checks.
pub const CODE_INVALID_SPEC: &str = "route53-invalid-spec";
/// Error code of a call about a zone that does not exist (outside delete, where that is
/// success).
pub const CODE_ZONE_NOT_FOUND: &str = "route53-zone-not-found";
/// Error code of a call about a zone another resource (or nobody in setpoint) owns.
pub const CODE_ZONE_NOT_OWNED: &str = "route53-zone-not-owned";
/// Error code of a delete refused because the zone holds records that are not ours.
pub const CODE_ZONE_NOT_EMPTY: &str = "route53-zone-not-empty";

/// Route 53's prefix of zone ids in its answers.
const ZONE_ID_PREFIX: &str = "/hostedzone/";

/// Hosted zones and their records on Route 53. Cheap to clone (the client is shared).
#[derive(Debug, Clone)]
pub struct Route53Dns {
    client: Client,
    config: Arc<Route53Config>,
    change: Budget,
}

impl Route53Dns {
    /// Connects with the standard AWS credential chain.
    ///
    /// # Errors
    /// [`ConfigError`] when the configuration is invalid; nothing is sent to AWS yet.
    pub async fn connect(config: Route53Config) -> Result<Self, ConfigError> {
        let client = config.client().await?;
        Ok(Self::from_client(client, config))
    }

    /// Uses an already built client (e.g. from
    /// [`Route53Config::client_with_credentials`]) with `config`'s paging settings.
    pub fn from_client(client: Client, config: Route53Config) -> Self {
        Self {
            change: change_budget(Arc::new(Unlimited), &config),
            client,
            config: Arc::new(config),
        }
    }

    /// Draws the record changes' tokens from `budgets` (the engine's, shared by every engine),
    /// at the limit of `budgets.change`. Without it nothing is limited. With a shared budget
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
        self.change = change_budget(budgets, &self.config);
        self
    }

    /// The Route 53 client, for tools and tests.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Finds the zone `request`'s resource owns, made by the unit with `token`, or creates it
    /// with `CallerReference = token` and tags it. Records are left to
    /// [`Route53Dns::sync_records`].
    ///
    /// Safe to run again with the same token at any time: a retry finds the zone by its
    /// `CallerReference` and adopts it (`adopted: true`), completing its tags if an earlier
    /// attempt stopped before tagging.
    ///
    /// # Errors
    /// Permanent: an invalid spec ([`CODE_INVALID_SPEC`]), a zone of this token with another
    /// name or tagged for another resource ([`CODE_ZONE_NOT_OWNED`]), and Route 53's
    /// permanent refusals. Transient: Route 53's transient failures, a lost fence.
    pub async fn ensure_zone(
        &self,
        token: &IdempotencyToken,
        request: &ZoneRequest,
        fence: &Fence,
    ) -> Result<ZoneInfo, AdapterError> {
        let desired = request.desired().map_err(invalid_spec)?;
        let span = info_span!("route53.ensure_zone", %token, zone = %desired.zone);
        async {
            // Observe before act: an earlier attempt may have created the zone already.
            let (zone, tags) = match self.find_zone(token).await? {
                Some(mut zone) => {
                    info!(zone_id = %zone.id, "adopting the zone an earlier attempt created");
                    zone.adopted = true;
                    let tags = self.check_adopted(&zone, token, request, &desired).await?;
                    (zone, tags)
                }
                None => match self.create_zone(token, request, &desired, fence).await {
                    Ok(zone) => (zone, BTreeMap::new()),
                    // AWS only (moto makes a second zone): Route 53 already used this token.
                    // Either the zone was not listed a moment ago, or it was deleted since:
                    // a CallerReference can create one zone, ever.
                    Err(e) if e.code.as_deref() == Some("HostedZoneAlreadyExists") => {
                        let Some(mut zone) = self.find_zone(token).await? else {
                            return Err(caller_reference_spent(token, &e));
                        };
                        zone.adopted = true;
                        let tags = self.check_adopted(&zone, token, request, &desired).await?;
                        (zone, tags)
                    }
                    Err(e) => return Err(e),
                },
            };
            self.ensure_tags(&zone, &tags, token, request, fence)
                .await?;
            Ok(zone)
        }
        .instrument(span)
        .await
    }

    /// The zone whose `CallerReference` is `create_token`, if any. Reads every page of
    /// `ListHostedZones` (Route 53 has no filter by caller reference).
    ///
    /// # Errors
    /// Route 53's failures, classified.
    pub async fn find_zone(
        &self,
        create_token: &IdempotencyToken,
    ) -> Result<Option<ZoneInfo>, AdapterError> {
        let mut found: Vec<HostedZone> = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_hosted_zones()
                .max_items(self.config.zones_page_size.clamp(1, 100) as i32)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| classify("ListHostedZones", &e))?;
            found.extend(
                page.hosted_zones()
                    .iter()
                    .filter(|z| z.caller_reference() == create_token.as_str())
                    .cloned(),
            );
            match page.next_marker() {
                Some(m) if page.is_truncated() && !m.is_empty() => marker = Some(m.to_owned()),
                _ => break,
            }
        }
        if found.len() > 1 {
            // Only where a repeated CallerReference is not refused (moto) and two creates
            // raced; adopt the first listed, leave the rest visible to an operator.
            warn!(
                token = %create_token,
                count = found.len(),
                "more than one zone carries this token as CallerReference; adopting the first"
            );
        }
        match found.first() {
            Some(zone) => self.get_zone(zone.id()).await,
            None => Ok(None),
        }
    }

    /// Brings the zone's comment and records to `request`'s spec: writes missing records,
    /// changes ours that differ, deletes ours the spec no longer holds, refuses (before any
    /// change) records that exist and are not ours. Apex SOA and NS are never touched.
    ///
    /// Safe to run again at any time: it reads the zone first and writes only the difference;
    /// records an earlier attempt wrote are recognised by their ownership records.
    ///
    /// # Errors
    /// Permanent: invalid spec, zone missing ([`CODE_ZONE_NOT_FOUND`]) or not this resource's
    /// ([`CODE_ZONE_NOT_OWNED`]), a record that is not ours
    /// ([`crate::CODE_NOT_OWNED`]), Route 53's permanent refusals. Transient: Route 53's
    /// transient failures, a lost fence.
    pub async fn sync_records(
        &self,
        token: &IdempotencyToken,
        zone: &ZoneRef,
        request: &ZoneRequest,
        fence: &Fence,
    ) -> Result<SyncOutcome, AdapterError> {
        let desired = request.desired().map_err(invalid_spec)?;
        let span = info_span!("route53.sync_records", %token, zone = %desired.zone);
        async {
            let info = self
                .resolve(zone)
                .await?
                .ok_or_else(|| zone_not_found(zone))?;
            if info.name != desired.zone {
                return Err(name_changed(&info, &desired));
            }
            self.check_owned(&info, zone, request.resource_id).await?;
            // Read and decide first: a refused sync changes nothing, not even the comment.
            let all = self.record_sets(&info.id).await?;
            let index = Index::new(&all, request.resource_id);
            let assessment = plan::assess(&index, &desired.records);
            let planned = plan::plan(&assessment, &desired.records, request.resource_id)?;
            let mut outcome = SyncOutcome {
                zone_id: info.id.clone(),
                ..SyncOutcome::default()
            };
            if comment_differs(info.comment.as_deref(), desired.comment.as_deref()) {
                info!(zone_id = %info.id, "updating the zone's comment (UpdateHostedZoneComment)");
                fence.check()?;
                self.client
                    .update_hosted_zone_comment()
                    .id(&info.id)
                    .set_comment(desired.comment.clone())
                    .send()
                    .await
                    .map_err(|e| classify("UpdateHostedZoneComment", &e))?;
                outcome.comment_updated = true;
            }
            outcome.change_batches = self
                .send_batches(token, &info.id, planned.batches, fence)
                .await?;
            outcome.created = planned.created;
            outcome.updated = planned.updated;
            outcome.deleted = planned.deleted;
            outcome.unchanged = planned.unchanged;
            info!(
                zone_id = %info.id,
                created = outcome.created.len(),
                updated = outcome.updated.len(),
                deleted = outcome.deleted.len(),
                unchanged = outcome.unchanged.len(),
                "records in sync"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// Reads the zone and our records and says how they differ from `request`'s spec (a
    /// missing zone, missing, changed or foreign records, records of ours the spec no longer
    /// holds, another comment). Changes nothing.
    ///
    /// # Errors
    /// Permanent: invalid spec, a zone that is not this resource's. Transient: Route 53's
    /// transient failures. A missing zone is not an error: it is [`Drift::ZoneMissing`].
    pub async fn observe_zone(
        &self,
        token: &IdempotencyToken,
        zone: &ZoneRef,
        request: &ZoneRequest,
    ) -> Result<ZoneObservation, AdapterError> {
        let desired = request.desired().map_err(invalid_spec)?;
        let span = info_span!("route53.observe_zone", %token, zone = %desired.zone);
        async {
            let missing = ZoneObservation {
                zone: None,
                records: Vec::new(),
                drift: vec![Drift::ZoneMissing],
            };
            let Some(info) = self.resolve(zone).await? else {
                return Ok(missing);
            };
            self.check_owned(&info, zone, request.resource_id).await?;
            let all = match self.record_sets(&info.id).await {
                Ok(all) => all,
                Err(e) if is_no_such_zone(&e) => return Ok(missing),
                Err(e) => return Err(e),
            };
            let index = Index::new(&all, request.resource_id);
            let assessment = plan::assess(&index, &desired.records);
            let mut drift = Vec::new();
            if comment_differs(info.comment.as_deref(), desired.comment.as_deref()) {
                drift.push(Drift::CommentChanged {
                    desired: desired.comment.clone(),
                    observed: info.comment.clone(),
                });
            }
            drift.extend(plan::drift(&assessment, &desired.records));
            Ok(ZoneObservation {
                records: index.ours(),
                zone: Some(info),
                drift,
            })
        }
        .instrument(span)
        .await
    }

    /// Deletes the records of `resource_id` in the zone (with their ownership records), then
    /// the zone. A zone that is already gone, or was never made, is success
    /// (`already_gone: true`).
    ///
    /// Refuses, before any change, a zone another resource owns and a zone that holds records
    /// that are not ours (Route 53 deletes only a zone with nothing but its SOA and NS).
    ///
    /// # Errors
    /// Permanent: [`CODE_ZONE_NOT_OWNED`], [`CODE_ZONE_NOT_EMPTY`], Route 53's permanent
    /// refusals. Transient: Route 53's transient failures, a lost fence.
    pub async fn delete_zone(
        &self,
        token: &IdempotencyToken,
        zone: &ZoneRef,
        resource_id: Uuid,
        fence: &Fence,
    ) -> Result<DeleteOutcome, AdapterError> {
        let span = info_span!("route53.delete_zone", %token, %resource_id);
        async {
            let gone = DeleteOutcome {
                already_gone: true,
                ..DeleteOutcome::default()
            };
            let Some(info) = self.resolve(zone).await? else {
                info!("nothing to delete: the zone is already gone");
                return Ok(gone);
            };
            self.check_owned(&info, zone, resource_id).await?;
            let all = match self.record_sets(&info.id).await {
                Ok(all) => all,
                Err(e) if is_no_such_zone(&e) => return Ok(gone),
                Err(e) => return Err(e),
            };
            let index = Index::new(&all, resource_id);
            let foreign = index.foreign(&info.name);
            if !foreign.is_empty() {
                let names: Vec<String> = foreign.iter().take(10).map(|r| r.describe()).collect();
                let more = foreign.len().saturating_sub(names.len());
                return Err(AdapterError::permanent(format!(
                    "refusing to delete zone {} ({}): it holds records setpoint does not own: \
                     {}{}. Delete them in Route 53 (or move them elsewhere), then retry the unit",
                    info.name,
                    info.id,
                    names.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ))
                .with_code(CODE_ZONE_NOT_EMPTY));
            }
            let assessment = plan::assess(&index, &BTreeMap::new());
            let planned = plan::plan(&assessment, &BTreeMap::new(), resource_id)?;
            self.send_batches(token, &info.id, planned.batches, fence)
                .await?;
            let mut outcome = DeleteOutcome {
                zone_id: Some(info.id.clone()),
                records_deleted: planned.deleted,
                ..DeleteOutcome::default()
            };
            info!(zone_id = %info.id, "deleting the zone (DeleteHostedZone)");
            fence.check()?;
            match self.client.delete_hosted_zone().id(&info.id).send().await {
                Ok(_) => outcome.zone_deleted = true,
                Err(e) => {
                    let e = classify("DeleteHostedZone", &e);
                    if !is_no_such_zone(&e) {
                        return Err(e);
                    }
                    outcome.already_gone = true;
                }
            }
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// Creates the zone with `CallerReference = token`, then tags it.
    async fn create_zone(
        &self,
        token: &IdempotencyToken,
        request: &ZoneRequest,
        desired: &Desired,
        fence: &Fence,
    ) -> Result<ZoneInfo, AdapterError> {
        let config = desired
            .comment
            .as_ref()
            .map(|c| HostedZoneConfig::builder().comment(c).build());
        info!("creating the zone (CreateHostedZone)");
        fence.check()?;
        let out = self
            .client
            .create_hosted_zone()
            .name(&desired.zone)
            .caller_reference(token.as_str())
            .set_hosted_zone_config(config)
            .send()
            .await
            .map_err(|e| {
                let e = classify("CreateHostedZone", &e);
                warn!(error = %e, "CreateHostedZone failed");
                e
            })?;
        let zone = out
            .hosted_zone()
            .map(|z| zone_info(z, out.delegation_set()))
            .ok_or_else(|| {
                AdapterError::transient("CreateHostedZone succeeded but returned no zone")
            })?;
        info!(zone_id = %zone.id, resource_id = %request.resource_id, "zone created");
        // Crash tests stop here: the zone exists, untagged, and its id is recorded nowhere.
        setpoint_adapter::failpoint::hit(FAILPOINT_AFTER_CREATE_ZONE);
        Ok(zone)
    }

    /// Refuses to adopt a zone of this token that is not what the request asks for; returns
    /// the zone's tags.
    async fn check_adopted(
        &self,
        zone: &ZoneInfo,
        token: &IdempotencyToken,
        request: &ZoneRequest,
        desired: &Desired,
    ) -> Result<BTreeMap<String, String>, AdapterError> {
        if zone.name != desired.zone {
            return Err(name_changed(zone, desired));
        }
        let tags = self.tags(&zone.id).await?;
        match tags.get(TAG_RESOURCE) {
            Some(id) if *id != request.resource_id.to_string() => {
                Err(AdapterError::permanent(format!(
                    "zone {} ({}) was created with this unit's token {token} but is tagged \
                     {TAG_RESOURCE}={id}, not {}: tokens must not be reused across resources; \
                     cancel the unit",
                    zone.name, zone.id, request.resource_id
                ))
                .with_code(CODE_ZONE_NOT_OWNED))
            }
            _ => Ok(tags),
        }
    }

    /// Adds the tags the zone lacks (`current`: what it has; all four are missing right after
    /// a create).
    async fn ensure_tags(
        &self,
        zone: &ZoneInfo,
        current: &BTreeMap<String, String>,
        token: &IdempotencyToken,
        request: &ZoneRequest,
        fence: &Fence,
    ) -> Result<(), AdapterError> {
        let wanted = [
            (TAG_MANAGED, "true".to_owned()),
            (TAG_RESOURCE, request.resource_id.to_string()),
            (TAG_TENANT, request.tenant.clone()),
            (TAG_TOKEN, token.to_string()),
        ];
        let missing: Vec<Tag> = wanted
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(v))
            .map(|(k, v)| Tag::builder().key(*k).value(v).build())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        info!(zone_id = %zone.id, tags = missing.len(), "tagging the zone (ChangeTagsForResource)");
        fence.check()?;
        self.client
            .change_tags_for_resource()
            .resource_type(TagResourceType::Hostedzone)
            .resource_id(&zone.id)
            .set_add_tags(Some(missing))
            .send()
            .await
            .map_err(|e| classify("ChangeTagsForResource", &e))?;
        Ok(())
    }

    /// The zone's tags.
    async fn tags(&self, zone_id: &str) -> Result<BTreeMap<String, String>, AdapterError> {
        let out = self
            .client
            .list_tags_for_resource()
            .resource_type(TagResourceType::Hostedzone)
            .resource_id(zone_id)
            .send()
            .await
            .map_err(|e| classify("ListTagsForResource", &e))?;
        Ok(out
            .resource_tag_set()
            .map(|s| s.tags())
            .unwrap_or_default()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or("").to_owned())))
            .collect())
    }

    /// Refuses a zone that is not `resource_id`'s: its tags must name the resource, or, if it
    /// has no resource tag (a crash between creating and tagging), its `CallerReference` must
    /// be the create token the caller knows.
    async fn check_owned(
        &self,
        zone: &ZoneInfo,
        zone_ref: &ZoneRef,
        resource_id: Uuid,
    ) -> Result<(), AdapterError> {
        let tags = self.tags(&zone.id).await?;
        let ours = match tags.get(TAG_RESOURCE) {
            Some(id) => *id == resource_id.to_string(),
            None => zone_ref
                .create_token
                .as_ref()
                .is_some_and(|t| t.as_str() == zone.caller_reference),
        };
        if ours {
            return Ok(());
        }
        Err(AdapterError::permanent(format!(
            "zone {} ({}) is not resource {resource_id}'s: its {TAG_RESOURCE} tag is {}. Check \
             the zone id recorded on the resource; setpoint changes only zones it created",
            zone.name,
            zone.id,
            tags.get(TAG_RESOURCE)
                .map_or_else(|| "missing".to_owned(), |v| format!("{v:?}")),
        ))
        .with_code(CODE_ZONE_NOT_OWNED))
    }

    /// The zone `zone_ref` names, if it exists.
    async fn resolve(&self, zone_ref: &ZoneRef) -> Result<Option<ZoneInfo>, AdapterError> {
        match (&zone_ref.zone_id, &zone_ref.create_token) {
            (Some(id), _) => self.get_zone(id).await,
            (None, Some(token)) => self.find_zone(token).await,
            (None, None) => Err(AdapterError::permanent(
                "the call names no zone: give the zone id recorded on the resource, or the \
                 token of the unit that created the zone",
            )
            .with_code("route53-no-zone")),
        }
    }

    /// `GetHostedZone`; `None` for `NoSuchHostedZone`.
    async fn get_zone(&self, zone_id: &str) -> Result<Option<ZoneInfo>, AdapterError> {
        match self
            .client
            .get_hosted_zone()
            .id(bare_id(zone_id))
            .send()
            .await
        {
            Ok(out) => Ok(out
                .hosted_zone()
                .map(|z| zone_info(z, out.delegation_set()))),
            Err(e) => {
                let e = classify("GetHostedZone", &e);
                if is_no_such_zone(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Every record set of the zone (all pages).
    async fn record_sets(&self, zone_id: &str) -> Result<Vec<Rrset>, AdapterError> {
        let mut out = Vec::new();
        let mut start: Option<(String, RrType, Option<String>)> = None;
        let mut previous = None;
        let mut seen = HashSet::new();
        loop {
            let mut call = self
                .client
                .list_resource_record_sets()
                .hosted_zone_id(zone_id)
                .max_items(self.config.records_page_size.clamp(1, 300) as i32);
            if let Some((name, rtype, identifier)) = start.take() {
                call = call
                    .start_record_name(name)
                    .start_record_type(rtype)
                    .set_start_record_identifier(identifier);
            }
            let page = call
                .send()
                .await
                .map_err(|e| classify("ListResourceRecordSets", &e))?;
            for r in page.resource_record_sets() {
                // A server that ignores StartRecordIdentifier (moto) repeats the weighted sets
                // of the name and type a page starts at; keep each set once.
                let key = (
                    r.name().to_owned(),
                    r.r#type().as_str().to_owned(),
                    r.set_identifier().map(str::to_owned),
                );
                if seen.insert(key) {
                    out.push(Rrset::new(r.clone()));
                }
            }
            let next = match (
                page.is_truncated(),
                page.next_record_name(),
                page.next_record_type(),
            ) {
                (true, Some(name), Some(rtype)) => (
                    name.to_owned(),
                    rtype.clone(),
                    page.next_record_identifier().map(str::to_owned),
                ),
                _ => return Ok(out),
            };
            if previous.as_ref() == Some(&next) {
                return Err(AdapterError::transient(format!(
                    "ListResourceRecordSets: the listing of zone {zone_id} did not advance past \
                     {} {}; retrying later",
                    next.1.as_str(),
                    next.0
                ))
                .with_code(crate::classify::codes::RESPONSE));
            }
            previous = Some(next.clone());
            start = Some(next);
        }
    }

    /// Sends the change batches in order, each after a fence check; returns how many.
    async fn send_batches(
        &self,
        token: &IdempotencyToken,
        zone_id: &str,
        batches: Vec<Vec<aws_sdk_route53::types::Change>>,
        fence: &Fence,
    ) -> Result<usize, AdapterError> {
        let count = batches.len();
        for (i, changes) in batches.into_iter().enumerate() {
            let batch = ChangeBatch::builder()
                .comment(format!("setpoint token={token}"))
                .set_changes(Some(changes))
                .build()
                .map_err(build_error)?;
            info!(
                zone_id,
                batch = i + 1,
                of = count,
                changes = batch.changes().len(),
                "changing records (ChangeResourceRecordSets)"
            );
            // The token first: the fence check must be the last thing before the change.
            self.change.take().await?;
            fence.check()?;
            let sent = self
                .client
                .change_resource_record_sets()
                .hosted_zone_id(zone_id)
                .change_batch(batch)
                .send()
                .await
                .map_err(|e| classify("ChangeResourceRecordSets", &e));
            self.change.report(sent).await?;
        }
        Ok(count)
    }
}

/// The `route53/<scope>/global/change` budget of `config`.
fn change_budget(budgets: Arc<dyn Budgets>, config: &Route53Config) -> Budget {
    let scope = config
        .budgets
        .scope
        .clone()
        .or_else(|| config.endpoint_url.clone())
        .unwrap_or_else(|| "aws".to_owned());
    Budget::new(
        budgets,
        BudgetKey::new("route53", scope, "global", "change"),
        config.budgets.change,
    )
}

/// A zone id without Route 53's `/hostedzone/` prefix.
fn bare_id(id: &str) -> &str {
    id.strip_prefix(ZONE_ID_PREFIX).unwrap_or(id)
}

fn zone_info(zone: &HostedZone, delegation: Option<&DelegationSet>) -> ZoneInfo {
    ZoneInfo {
        id: bare_id(zone.id()).to_owned(),
        name: crate::name::from_route53(zone.name()),
        name_servers: delegation
            .map(|d| d.name_servers().to_vec())
            .unwrap_or_default(),
        comment: zone
            .config()
            .and_then(|c| c.comment())
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        caller_reference: zone.caller_reference().to_owned(),
        adopted: false,
    }
}

/// Route 53 keeps an absent comment as absent or empty; both mean "no comment".
fn comment_differs(observed: Option<&str>, desired: Option<&str>) -> bool {
    observed.unwrap_or("") != desired.unwrap_or("")
}

fn invalid_spec(e: InvalidSpec) -> AdapterError {
    AdapterError::permanent(format!("{e}; fix the resource's spec")).with_code(CODE_INVALID_SPEC)
}

fn zone_not_found(zone: &ZoneRef) -> AdapterError {
    AdapterError::permanent(format!(
        "the hosted zone ({}) does not exist: it was deleted outside setpoint, or never created. \
         Let the resync recreate it, or cancel the unit",
        match (&zone.zone_id, &zone.create_token) {
            (Some(id), _) => format!("id {id}"),
            (None, Some(t)) => format!("created by token {t}"),
            (None, None) => "unnamed".to_owned(),
        }
    ))
    .with_code(CODE_ZONE_NOT_FOUND)
}

fn caller_reference_spent(token: &IdempotencyToken, e: &AdapterError) -> AdapterError {
    AdapterError::permanent(format!(
        "CreateHostedZone: Route 53 already created a zone with this unit's token {token} as \
         CallerReference, and no such zone exists now ({}): it was deleted outside setpoint, \
         and Route 53 never lets a CallerReference create a second zone. Cancel this unit (a \
         new unit, with a new token, creates the zone); if the zone does show up in Route 53, \
         retry the unit instead and it is adopted",
        e.message
    ))
    .with_code("HostedZoneAlreadyExists")
}

fn name_changed(zone: &ZoneInfo, desired: &Desired) -> AdapterError {
    AdapterError::permanent(format!(
        "zone {} is named {}, the spec asks for {}: a zone's name cannot change. Restore the \
         name in the spec, or make a new dns.zone resource",
        zone.id, zone.name, desired.zone
    ))
    .with_code(CODE_ZONE_NOT_OWNED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_ids_lose_their_prefix_and_comments_compare_loosely() {
        assert_eq!(bare_id("/hostedzone/Z123"), "Z123");
        assert_eq!(bare_id("Z123"), "Z123");
        assert!(!comment_differs(None, Some("")));
        assert!(comment_differs(Some("a"), None));
    }
}
