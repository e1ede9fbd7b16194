//! What the API does, in domain terms; the gRPC layer only converts at the edges.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    clock::Clock,
    domain::{
        Actor, AllowedCidrs, Annotations, CreditPlan, Credits, EventKind, Expiry, InvalidInput,
        Key, KeyCredits, KeyEvent, KeyField, KeyId, KeyName, OwnerId, PageCursor, PresentedKey,
        RateLimitAsk, RateLimits, Scopes, Secret, Validation, WorkspaceId, check_required,
    },
    error::{ApiError, KeyStateConflict},
    index::{CreditCall, Found, KeyIndex, LeaseCall, Syncer, WindowCall},
    store::{Change, Changed, IndexRow, KeyUpdate, NewEvent, NewKey, Store},
    usage::HourUsage,
};

/// ListKeys page size when the caller gives none.
pub(crate) const DEFAULT_PAGE_SIZE: u64 = 50;
/// ListKeys never returns more than this many keys at once.
pub(crate) const MAX_PAGE_SIZE: u64 = 1000;
/// RotateKey's longest grace period for the old key.
pub(crate) const MAX_GRACE_PERIOD: TimeDelta = TimeDelta::days(7);
/// A key's last use is noted in memory at most this often; a flush writes it within about a
/// second more.
const LAST_USED_RESOLUTION: TimeDelta = TimeDelta::seconds(1);

#[derive(Debug, Clone)]
pub struct KeyService {
    store: Store,
    clock: Arc<dyn Clock>,
    syncer: Arc<Syncer>,
    index: Arc<KeyIndex>,
}

/// What a new key carries besides its name and expiry; every part may be empty.
#[derive(Debug, Default, Clone)]
pub(crate) struct KeyTerms {
    pub scopes: Scopes,
    pub owner_id: OwnerId,
    pub annotations: Annotations,
    pub allowed_cidrs: AllowedCidrs,
    pub rate_limits: RateLimits,
    /// `None`: unlimited.
    pub credits: Option<Credits>,
}

/// What UpdateKey changes; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub(crate) struct KeyEdit {
    pub name: Option<KeyName>,
    pub scopes: Option<Scopes>,
    pub owner_id: Option<OwnerId>,
    pub annotations: Option<Annotations>,
    pub allowed_cidrs: Option<AllowedCidrs>,
    pub rate_limits: Option<RateLimits>,
    /// `Some(None)` makes the key unlimited.
    pub credits: Option<Option<Credits>>,
}

/// RotateKey's result.
#[derive(Debug)]
pub(crate) struct Rotated {
    pub key: Key,
    pub secret: Secret,
    pub old_key: Key,
}

#[derive(Debug)]
pub struct ValidateOutcome {
    pub result: Validation,
    /// The key, when it is known (every result but Malformed and NotFound).
    pub key: Option<Found>,
}

#[derive(Debug)]
pub(crate) struct Page {
    pub keys: Vec<Key>,
    pub next: Option<PageCursor>,
}

#[derive(Debug)]
pub(crate) struct EventPage {
    pub events: Vec<KeyEvent>,
    /// The id of the last event, when another page follows.
    pub next: Option<i64>,
}

/// GetKeyUsage's answer.
#[derive(Debug)]
pub(crate) struct KeyUsage {
    pub hours: Vec<HourUsage>,
    /// The key as stored, with the last use this replica saw.
    pub key: Key,
}

impl KeyService {
    /// `syncer` keeps the index that ValidateKey reads in step with `store`.
    pub fn new(store: Store, clock: Arc<dyn Clock>, syncer: Arc<Syncer>) -> Self {
        let index = syncer.index().clone();
        Self {
            store,
            clock,
            syncer,
            index,
        }
    }

    /// The current time, at the microsecond precision the database keeps.
    pub(crate) fn now(&self) -> DateTime<Utc> {
        let now = self.clock.now();
        DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
    }

    pub(crate) async fn create(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        name: &KeyName,
        expiry: Expiry,
        terms: KeyTerms,
    ) -> Result<(Key, Secret), ApiError> {
        let now = self.now();
        let expire_time = expiry.expire_time(now)?;
        let secret = Secret::generate();
        let id = KeyId::generate();
        let key = self
            .store
            .insert(
                NewKey {
                    id: &id,
                    workspace,
                    name: name.clone(),
                    hash: secret.hash(),
                    suffix: secret.suffix(),
                    created_by: actor.id(),
                    create_time: now,
                    expire_time,
                    scopes: terms.scopes,
                    owner_id: terms.owner_id,
                    annotations: terms.annotations,
                    allowed_cidrs: terms.allowed_cidrs,
                    rate_limits: terms.rate_limits,
                    credits: KeyCredits(terms.credits.map(|credits| CreditPlan {
                        account: id.as_str().into(),
                        generation: 1,
                        refill: credits.refill,
                    })),
                    balance: terms.credits,
                },
                NewEvent::new(EventKind::Created, actor, now),
            )
            .await?;
        let mut key = key;
        self.fill_credits_after_write(&mut [&mut key]).await;
        if key.credits_remaining.is_none() {
            // Just written: the balance is the one given.
            key.credits_remaining = terms.credits.map(|credits| credits.remaining);
        }
        // This replica answers for the key before CreateKey returns.
        self.index.apply(&IndexRow::from(&key));
        tracing::info!(key_id = %id, workspace_id = %workspace, actor_id = actor.id(), "key created");
        Ok((key, secret))
    }

    /// With an owner, only that owner's keys.
    pub(crate) async fn list(
        &self,
        workspace: &WorkspaceId,
        owner: &OwnerId,
        page_size: u64,
        after: Option<&PageCursor>,
    ) -> Result<Page, ApiError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        // One extra row tells whether another page follows, without a count query.
        let mut keys = self
            .store
            .list(workspace, owner, after, page_size + 1)
            .await?;
        let next = if keys.len() as u64 > page_size {
            keys.truncate(page_size as usize);
            keys.last().map(|last| PageCursor {
                create_time_us: last.create_time.timestamp_micros(),
                id: last.id.clone(),
            })
        } else {
            None
        };
        for key in &mut keys {
            self.note_unflushed_use(key);
        }
        self.fill_credits(&mut keys.iter_mut().collect::<Vec<_>>())
            .await?;
        Ok(Page { keys, next })
    }

    /// This replica may have seen uses of the key that are not flushed yet.
    fn note_unflushed_use(&self, key: &mut Key) {
        if let Some(used) = self
            .index
            .last_used_us(&key.hash)
            .and_then(DateTime::from_timestamp_micros)
        {
            key.last_used_time = key.last_used_time.max(Some(used));
        }
    }

    /// A live key of the workspace.
    pub(crate) async fn get(&self, workspace: &WorkspaceId, id: &KeyId) -> Result<Key, ApiError> {
        match self.store.get(workspace, id).await? {
            Some(mut key) if !key.is_deleted() => {
                self.note_unflushed_use(&mut key);
                self.fill_credits(&mut [&mut key]).await?;
                Ok(key)
            }
            _ => Err(ApiError::KeyNotFound),
        }
    }

    /// Changes a key through `decide`, applies what changed to this replica's index before
    /// returning, and logs it as `what`. A live key whose etag is not `etag` (empty: any) is
    /// refused before `decide` sees it; a deleted one is for `decide` to answer.
    async fn change<'a>(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
        (what, etag): (&'static str, &str),
        decide: impl FnOnce(&Key) -> Result<Option<Change<'a>>, ApiError>,
    ) -> Result<Changed, ApiError> {
        let mut changed = self
            .store
            .change(workspace, id, |key| {
                if !key.is_deleted() && !key.etag_matches(etag) {
                    return Err(ApiError::EtagMismatch);
                }
                decide(key)
            })
            .await?
            .ok_or(ApiError::KeyNotFound)?;
        if changed.changed {
            // The very next ValidateKey on this replica sees the change.
            if let Some(inserted) = &changed.inserted {
                self.index.apply(&IndexRow::from(inserted));
            }
            self.index.apply(&IndexRow::from(&changed.key));
            tracing::info!(key_id = %id, workspace_id = %workspace, actor_id = actor.id(), "key {what}");
        }
        self.note_unflushed_use(&mut changed.key);
        let mut keys = vec![&mut changed.key];
        keys.extend(changed.inserted.as_mut());
        self.fill_credits_after_write(&mut keys).await;
        Ok(changed)
    }

    /// Each key's balance: its account's, as stored, and what this replica holds of it.
    /// Read under each key's lease gate, so a slice moving between the database and this
    /// replica is seen in one place, not in neither.
    /// [`Self::fill_credits`] once a change has committed: a failure to read the balance
    /// must not report the change as failed (a new key's secret would be lost with it).
    async fn fill_credits_after_write(&self, keys: &mut [&mut Key]) {
        if let Err(err) = self.fill_credits(keys).await {
            tracing::warn!(error = %err, "cannot read the balance of a key just changed; shown without it");
        }
    }

    async fn fill_credits(&self, keys: &mut [&mut Key]) -> Result<(), ApiError> {
        // Taken in one order (by account), so two readers never wait on each other.
        let mut accounts: Vec<_> = keys
            .iter()
            .filter_map(|key| key.credits.plan().map(|plan| plan.account.clone()))
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        let gates: Vec<_> = accounts
            .iter()
            .map(|account| self.index.lease_gate(account))
            .collect();
        let mut turns = Vec::with_capacity(gates.len());
        for gate in &gates {
            turns.push(gate.lock().await);
        }
        self.store.fill_credits(keys, self.clock.now_us()).await?;
        for key in keys.iter_mut() {
            if let (Some(remaining), Some(plan)) = (&mut key.credits_remaining, key.credits.plan())
            {
                *remaining +=
                    self.index
                        .credits_held(&plan.account, plan.generation, self.clock.now_us());
            }
        }
        Ok(())
    }

    pub(crate) async fn update(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
        edit: KeyEdit,
        etag: &str,
    ) -> Result<Key, ApiError> {
        let mut event = NewEvent::new(EventKind::Updated, actor, self.now());
        let changed = self
            .change(actor, workspace, id, ("updated", etag), |key| {
                if key.is_deleted() {
                    return Err(ApiError::KeyState(KeyStateConflict::Deleted));
                }
                let name = edit.name.filter(|name| *name != key.name);
                let scopes = edit.scopes.filter(|scopes| *scopes != key.scopes);
                let owner_id = edit.owner_id.filter(|owner| *owner != key.owner_id);
                let annotations = edit.annotations.filter(|given| *given != key.annotations);
                let allowed_cidrs = edit
                    .allowed_cidrs
                    .filter(|given| *given != key.allowed_cidrs);
                let rate_limits = edit.rate_limits.filter(|given| *given != key.rate_limits);
                // Setting a balance always changes it (it starts again from what is given);
                // clearing changes only a key that had credits.
                let credits = match edit.credits {
                    Some(Some(_)) if key.rotated_to.is_some() => {
                        // Its successor spends from the same account and sets it.
                        return Err(ApiError::KeyState(KeyStateConflict::CreditsOfSuccessor));
                    }
                    Some(Some(credits)) => {
                        let plan = key.credits.plan();
                        Some((
                            KeyCredits(Some(CreditPlan {
                                account: plan.map_or_else(
                                    || key.id.as_str().into(),
                                    |plan| plan.account.clone(),
                                ),
                                generation: plan.map_or(1, |plan| plan.generation + 1),
                                refill: credits.refill,
                            })),
                            Some(credits),
                        ))
                    }
                    Some(None) if key.credits.plan().is_some() => Some((KeyCredits(None), None)),
                    _ => None,
                };
                event.changed_fields = [
                    (KeyField::Name, name.is_some()),
                    (KeyField::Scopes, scopes.is_some()),
                    (KeyField::OwnerId, owner_id.is_some()),
                    (KeyField::Annotations, annotations.is_some()),
                    (KeyField::AllowedCidrs, allowed_cidrs.is_some()),
                    (KeyField::RateLimits, rate_limits.is_some()),
                    (KeyField::Credits, credits.is_some()),
                ]
                .into_iter()
                .filter_map(|(field, changed)| changed.then_some(field))
                .collect();
                Ok((!event.changed_fields.is_empty()).then(|| Change {
                    update: KeyUpdate {
                        name,
                        scopes,
                        owner_id,
                        annotations,
                        allowed_cidrs,
                        rate_limits,
                        balance: credits.as_ref().and_then(|(_, balance)| *balance),
                        credits: credits.map(|(plan, _)| plan),
                        ..Default::default()
                    },
                    insert: None,
                    event,
                }))
            })
            .await?;
        Ok(changed.key)
    }

    /// Disables (`true`) or enables (`false`) a key; doing it twice changes nothing.
    pub(crate) async fn set_disabled(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
        disabled: bool,
        etag: &str,
    ) -> Result<Key, ApiError> {
        let now = self.now();
        let (what, kind) = if disabled {
            ("disabled", EventKind::Disabled)
        } else {
            ("enabled", EventKind::Enabled)
        };
        let changed = self
            .change(actor, workspace, id, (what, etag), |key| {
                if key.is_deleted() {
                    return Err(ApiError::KeyState(KeyStateConflict::Deleted));
                }
                // An expired key stays as it is: enabling cannot revive it.
                if !disabled && key.has_expired(now) {
                    return Err(ApiError::KeyState(KeyStateConflict::Expired));
                }
                if key.is_disabled() == disabled {
                    return Ok(None);
                }
                Ok(Some(Change {
                    update: KeyUpdate {
                        disable_time: Some(disabled.then_some(now)),
                        ..Default::default()
                    },
                    insert: None,
                    event: NewEvent::new(kind, actor, now),
                }))
            })
            .await?;
        Ok(changed.key)
    }

    /// Issues a successor to an active key and makes the old one expire after `grace`.
    pub(crate) async fn rotate(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
        grace: TimeDelta,
        etag: &str,
    ) -> Result<Rotated, ApiError> {
        let now = self.now();
        let secret = Secret::generate();
        let new_id = KeyId::generate();
        let changed = self
            .change(actor, workspace, id, ("rotated", etag), |key| {
                if key.is_deleted() {
                    return Err(ApiError::KeyState(KeyStateConflict::Deleted));
                }
                if key.has_expired(now) {
                    return Err(ApiError::KeyState(KeyStateConflict::Expired));
                }
                if key.is_disabled() {
                    return Err(ApiError::KeyState(KeyStateConflict::Disabled));
                }
                // One successor per key: a second rotation (a retry, a double click) would
                // issue another live key and measure its lifetime from the grace period.
                if key.rotated_to.is_some() {
                    return Err(ApiError::KeyState(KeyStateConflict::Rotated));
                }
                // Same lifetime as the old key; never stays never.
                let lifetime = key.expire_time.map(|at| at - key.create_time);
                let grace_end = now + grace;
                Ok(Some(Change {
                    update: KeyUpdate {
                        expire_time: Some(Some(
                            key.expire_time.map_or(grace_end, |at| at.min(grace_end)),
                        )),
                        rotated_to: Some(new_id.clone()),
                        ..Default::default()
                    },
                    insert: Some(NewKey {
                        id: &new_id,
                        workspace,
                        name: key.name.clone(),
                        hash: secret.hash(),
                        suffix: secret.suffix(),
                        created_by: actor.id(),
                        create_time: now,
                        expire_time: lifetime.map(|lifetime| now + lifetime),
                        scopes: key.scopes.clone(),
                        owner_id: key.owner_id.clone(),
                        annotations: key.annotations.clone(),
                        allowed_cidrs: key.allowed_cidrs.clone(),
                        rate_limits: key.rate_limits.clone(),
                        // The successor spends from the same balance: rotating mints none.
                        credits: key.credits.clone(),
                        balance: None,
                    }),
                    event: NewEvent {
                        new_key_id: Some(new_id.clone()),
                        ..NewEvent::new(EventKind::Rotated, actor, now)
                    },
                }))
            })
            .await?;
        let key = changed.inserted.ok_or_else(|| {
            ApiError::Store(crate::store::StoreError::Internal(sea_orm::DbErr::Custom(
                "a rotation inserted no key".into(),
            )))
        })?;
        tracing::info!(key_id = %key.id, rotated_key_id = %id, workspace_id = %workspace, "key issued by rotation");
        Ok(Rotated {
            key,
            secret,
            old_key: changed.key,
        })
    }

    pub(crate) async fn delete(
        &self,
        actor: &Actor,
        workspace: &WorkspaceId,
        id: &KeyId,
        etag: &str,
    ) -> Result<(), ApiError> {
        let now = self.now();
        // The very next ValidateKey on this replica answers DELETED.
        self.change(actor, workspace, id, ("deleted", etag), |key| {
            // Deleted already: as if it never was.
            if key.is_deleted() {
                return Err(ApiError::KeyNotFound);
            }
            Ok(Some(Change {
                update: KeyUpdate {
                    delete_time: Some(now),
                    ..Default::default()
                },
                insert: None,
                event: NewEvent::new(EventKind::Deleted, actor, now),
            }))
        })
        .await?;
        Ok(())
    }

    /// A workspace's events, or one key's, newest first, after the event `before`.
    pub(crate) async fn events(
        &self,
        workspace: &WorkspaceId,
        key: Option<&KeyId>,
        page_size: u64,
        before: Option<i64>,
    ) -> Result<EventPage, ApiError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let mut events = self
            .store
            .events(workspace, key, before, page_size + 1)
            .await?;
        let next = (events.len() as u64 > page_size).then(|| {
            events.truncate(page_size as usize);
            events.last().map(|last| last.id)
        });
        Ok(EventPage {
            events,
            next: next.flatten(),
        })
    }

    /// A key's hourly usage in `[from_us, to_us)`; the key may be deleted.
    pub(crate) async fn usage(
        &self,
        workspace: &WorkspaceId,
        id: &KeyId,
        from_us: i64,
        to_us: i64,
    ) -> Result<KeyUsage, ApiError> {
        let Some(mut key) = self.store.get(workspace, id).await? else {
            return Err(ApiError::KeyNotFound);
        };
        let hours = self.store.usage(workspace, id, from_us, to_us).await?;
        // A use this replica saw may not be flushed yet.
        if let Some((at, ip)) = self.index.last_seen_use(&key.hash)
            && let Some(at) = DateTime::from_timestamp_micros(at)
        {
            key.note_use(at, ip);
        }
        Ok(KeyUsage { hours, key })
    }

    /// Answers from memory: no database round trip, whatever the input. `required` are the
    /// scopes the key must all have; `client_ip`, where the gateway saw the key come from;
    /// `asks`, what the request spends from the key's rate limits; `cost`, from its credits.
    /// A key with credits whose slice on this replica cannot pay answers
    /// [`Validated::Lease`]: [`KeyService::lease`], then ask again (at most [`LEASE_ROUNDS`]
    /// times; the gRPC and Check paths do).
    pub fn validate<S: AsRef<str>>(
        &self,
        presented: &str,
        required: &[S],
        client_ip: Option<IpAddr>,
        asks: &[RateLimitAsk<'_>],
        cost: i64,
    ) -> Result<Validated, ApiError> {
        // The gateway's configuration is at fault, whatever the key.
        check_required(required)?;
        RateLimitAsk::check_all(asks)?;
        if cost < 0 {
            return Err(InvalidInput::CostInvalid.into());
        }
        // Garbage and typos are answered from the input alone, even when the index is stale.
        let Ok(key) = PresentedKey::parse(presented) else {
            return Ok(Validated::Answer(ValidateOutcome {
                result: Validation::Malformed,
                key: None,
            }));
        };
        // Fail closed: a stale index might still hold a key deleted elsewhere.
        if !self.syncer.is_fresh() {
            return Err(ApiError::IndexStale(self.syncer.staleness()));
        }
        let now = self.clock.now_us();
        let resolution = LAST_USED_RESOLUTION.num_microseconds().unwrap_or(1_000_000);
        let Some(mut found) = self.index.lookup(
            &key.hash(),
            required,
            now,
            resolution,
            client_ip,
            asks,
            cost,
        ) else {
            return Ok(Validated::Answer(ValidateOutcome {
                result: Validation::NotFound,
                key: None,
            }));
        };
        match std::mem::take(&mut found.credit_call) {
            CreditCall::Wait(call) => return Ok(Validated::Lease(call)),
            CreditCall::Prefetch(call) => {
                // The next slice arrives while this one is spent.
                let service = self.clone();
                tokio::spawn(async move {
                    let _ = service.lease(call).await;
                });
            }
            CreditCall::None => {}
        }
        Ok(Validated::Answer(ValidateOutcome {
            result: found.result,
            key: Some(found),
        }))
    }

    /// Leases credits for a key from its account into the index; one lease per account at
    /// a time on this replica (a request that waited for another's finds its slice). Runs
    /// on a task of its own: a caller that gives up (a deadline, a reset) cannot cut it
    /// between the database taking the slice and the index holding it.
    pub async fn lease(&self, call: LeaseCall) -> Result<(), ApiError> {
        let service = self.clone();
        tokio::spawn(async move { service.lease_now(call).await })
            .await
            .map_err(|_| ApiError::CreditsBusy)?
    }

    async fn lease_now(&self, call: LeaseCall) -> Result<(), ApiError> {
        let gate = self.index.lease_gate(&call.account);
        let _turn = gate.lock().await;
        if self.index.credits_closing() {
            return Err(ApiError::ShuttingDown);
        }
        if let Some(window) = &call.window {
            return self
                .lease_window(&call.account, window, call.prefetch)
                .await;
        }
        let now = self.clock.now_us();
        // Another request's lease may have come while this one waited: a request needs
        // the slice known and big enough, a prefetch only that it is still wanted.
        if self
            .index
            .credits_ready(&call.account, call.need, call.prefetch, now)
        {
            self.index.credit_lease_not_taken(&call.account);
            return Ok(());
        }
        let held = self.index.credits_held(&call.account, 0, now);
        let need = (call.need - held).max(0);
        match self.store.lease_credits(&call.account, need, now).await {
            Ok(lease) => {
                self.syncer.credit_leases.inc();
                self.index.credit_leased(&call.account, lease, now);
                Ok(())
            }
            Err(err) => {
                self.syncer.credit_lease_failures.inc();
                self.index.credit_lease_not_taken(&call.account);
                tracing::warn!(error = %err, "cannot lease credits");
                Err(ApiError::Store(err))
            }
        }
    }

    /// Leases a slice of a rate-limit window (`id`) into the key's windows, under the
    /// window's lease gate.
    async fn lease_window(
        &self,
        id: &str,
        call: &WindowCall,
        prefetch: bool,
    ) -> Result<(), ApiError> {
        let lease = &call.lease;
        if !lease.recheck && self.index.window_ready(call, prefetch) {
            self.index.window_lease_not_taken(call);
            return Ok(());
        }
        let need = (lease.need - self.index.window_held(call)).max(0);
        // A check (cost 0) of a window this replica knows nothing of, and a second look at
        // one that ran out, only read it.
        let take = !lease.recheck && (prefetch || lease.need > 0);
        match self
            .store
            .lease_window(id, lease.ends_us(), lease.limit, need, take)
            .await
        {
            Ok((granted, unleased)) => {
                self.syncer.rate_limit_leases.inc();
                self.index.window_leased(call, granted, unleased);
                Ok(())
            }
            Err(err) => {
                self.syncer.rate_limit_lease_failures.inc();
                self.index.window_lease_not_taken(call);
                tracing::warn!(error = %err, "cannot lease a rate-limit window");
                Err(ApiError::Store(err))
            }
        }
    }
}

/// A validation's answer, or the lease it needs first.
// The answer is the common variant, moved by value: boxing it would allocate on every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Validated {
    Answer(ValidateOutcome),
    Lease(LeaseCall),
}

/// Rounds of lease and look-up a validation tries before it gives up: a key's first use on
/// a replica may lease a slice of each of its limits' windows (up to 8) and of its credits,
/// one a round, and a slice may be spent by other requests before this one is judged.
pub(crate) const LEASE_ROUNDS: usize = 2 * crate::domain::MAX_RATE_LIMITS;
