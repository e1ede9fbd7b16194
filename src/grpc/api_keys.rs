use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::field::Empty;

use super::proto::{
    self, ApiKey, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse,
    DisableKeyRequest, EnableKeyRequest, GetKeyRequest, GetKeyUsageRequest, GetKeyUsageResponse,
    KeyEvent, KeyEventType, KeyStatus, ListKeyEventsRequest, ListKeyEventsResponse,
    ListKeysRequest, ListKeysResponse, RotateKeyRequest, RotateKeyResponse, UpdateKeyRequest,
    UsageBucket, ValidateKeyRequest, ValidateKeyResponse, ValidateKeysRequest,
    ValidateKeysResponse, ValidationResult, api_keys_server::ApiKeys,
};
use crate::{
    domain::{
        Actor, EventCursor, EventKind, Expiration, Expiry, InvalidInput, Key, KeyId, KeyName,
        PageCursor, Scopes, Validation, WorkspaceId,
    },
    error::ApiError,
    grpc::guard::ManagementRate,
    observability::metrics::Metrics,
    observability::telemetry,
    service::{DEFAULT_PAGE_SIZE, KeyEdit, KeyService, MAX_GRACE_PERIOD},
    usage::{UsageCounts, hour_start},
};

/// Metadata naming the person a management call acts for.
const ACTOR_ID_HEADER: &str = "x-actor-id";
const ACTOR_ROLE_HEADER: &str = "x-actor-role";
/// GetKeyUsage's longest range: a quarter and a bit, enough for the product's 90 days.
const MAX_USAGE_RANGE_US: i64 = 93 * 24 * 3_600_000_000;

/// ValidateKey's request limit: ample for any key (junk below it is answered MALFORMED),
/// a quarter of what other calls may send.
pub const VALIDATE_MAX_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct ApiKeysService {
    keys: KeyService,
    rate: ManagementRate,
    metrics: Option<Arc<Metrics>>,
    /// Turns true when the server starts draining.
    draining: Option<tokio::sync::watch::Receiver<bool>>,
}

impl ApiKeysService {
    /// The service, holding management calls to `rate` in each workspace.
    pub fn new(keys: KeyService, rate: ManagementRate) -> Self {
        Self {
            keys,
            rate,
            metrics: None,
            draining: None,
        }
    }

    /// The workspace a management call names, once the call is counted against its
    /// caller's rate there.
    fn workspace<T>(&self, request: &Request<T>, id: &str) -> Result<WorkspaceId, ApiError> {
        let workspace = WorkspaceId::parse(id)?;
        tracing::Span::current().record("workspace_id", workspace.as_str());
        self.rate
            .check_workspace(request.extensions(), &workspace)?;
        Ok(workspace)
    }

    /// A key named by its workspace and id, both checked, and the call counted as
    /// [`Self::workspace`] does.
    fn key_of<T>(
        &self,
        request: &Request<T>,
        workspace_id: &str,
        key_id: &str,
    ) -> Result<(WorkspaceId, KeyId), ApiError> {
        let workspace = self.workspace(request, workspace_id)?;
        let id = KeyId::parse(key_id)?;
        tracing::Span::current().record("key_id", id.as_str());
        Ok((workspace, id))
    }

    /// ValidateKey's answer to `request`, counted in metrics.
    fn judge(&self, request: &ValidateKeyRequest) -> Result<ValidateKeyResponse, ApiError> {
        if prost::Message::encoded_len(request) > VALIDATE_MAX_BYTES {
            return Err(ApiError::RequestTooLarge {
                rpc: "ValidateKey",
                limit: VALIDATE_MAX_BYTES,
            });
        }
        let client_ip = match request.client_ip.as_str() {
            "" => None,
            ip => Some(
                ip.parse::<std::net::IpAddr>()
                    .map_err(|_| InvalidInput::ClientIpInvalid)?,
            ),
        };
        let outcome = self
            .keys
            .validate(&request.key, &request.required_scopes, client_ip)?;
        let result = answered(outcome.result, self.metrics.as_deref());
        let mut response = ValidateKeyResponse {
            valid: result == ValidationResult::Valid,
            result: result.into(),
            ..Default::default()
        };
        if let Some(found) = outcome.key {
            response.expire_time = found.expire_time_us.map(timestamp);
            response.key_id = found.id;
            response.workspace_id = found.workspace;
            response.scopes = found.scopes;
            response.name = found.name;
        }
        Ok(response)
    }

    /// ValidateKey, answered from memory: [`ApiKeysRoutes`](super::ApiKeysRoutes) calls it
    /// without a future, the generated server through [`ApiKeys::validate_key`].
    pub(crate) fn validate_now(
        &self,
        request: &ValidateKeyRequest,
    ) -> Result<ValidateKeyResponse, Status> {
        // The one call on every gateway request: its span exists only for a trace exporter
        // (the log layer would keep one for every call at `info`, fields formatted, though
        // no event in it is ever logged).
        let span = telemetry::hot_span(|| {
            tracing::info_span!("ValidateKey", result = Empty, key_id = Empty)
        });
        let _entered = span.enter();
        let response = self.judge(request)?;
        if !span.is_none() {
            span.record("result", response.result().as_str_name());
            if !response.key_id.is_empty() {
                span.record("key_id", response.key_id.as_str());
            }
        }
        Ok(response)
    }

    /// Counts ValidateKey answers by result in `metrics`.
    pub fn with_metrics(self, metrics: Option<Arc<Metrics>>) -> Self {
        Self { metrics, ..self }
    }

    /// Ends ValidateKeys streams (UNAVAILABLE, `SHUTTING_DOWN`) once `draining` turns true.
    pub fn with_draining(self, draining: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            draining: Some(draining),
            ..self
        }
    }

    /// DisableKey and EnableKey.
    async fn set_disabled(
        &self,
        request: Request<(String, String)>,
        disabled: bool,
    ) -> Result<Response<ApiKey>, Status> {
        let actor = actor(request.metadata())?;
        let (workspace_id, key_id) = request.get_ref();
        let (workspace, id) = self.key_of(&request, workspace_id, key_id)?;
        let row = self
            .keys
            .set_disabled(&actor, &workspace, &id, disabled)
            .await?;
        Ok(Response::new(api_key(row, self.keys.now())))
    }
}

#[tonic::async_trait]
impl ApiKeys for ApiKeysService {
    #[tracing::instrument(name = "CreateKey", skip_all, fields(workspace_id, key_id))]
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        let actor = actor(request.metadata())?;
        let workspace = self.workspace(&request, &request.get_ref().workspace_id)?;
        let request = request.into_inner();
        let name = KeyName::parse(&request.name).map_err(ApiError::from)?;
        let expiry = expiry(request.expiration, request.expire_time).map_err(ApiError::from)?;
        let scopes = Scopes::parse(&request.scopes).map_err(ApiError::from)?;
        let (key, secret) = self
            .keys
            .create(&actor, &workspace, &name, expiry, &scopes)
            .await?;
        tracing::Span::current().record("key_id", key.id.as_str());
        let now = self.keys.now();
        Ok(Response::new(CreateKeyResponse {
            key: Some(api_key(key, now)),
            secret: secret.expose().to_owned(),
        }))
    }

    #[tracing::instrument(name = "ListKeys", skip_all, fields(workspace_id))]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        actor(request.metadata())?;
        let workspace = self.workspace(&request, &request.get_ref().workspace_id)?;
        let request = request.into_inner();
        let page_size = page_size(request.page_size)?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(PageCursor::decode(token, &workspace).map_err(ApiError::from)?),
        };
        let page = self
            .keys
            .list(&workspace, page_size, after.as_ref())
            .await?;
        let now = self.keys.now();
        Ok(Response::new(ListKeysResponse {
            keys: page.keys.into_iter().map(|key| api_key(key, now)).collect(),
            next_page_token: page
                .next
                .map(|cursor| cursor.encode(&workspace))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "DeleteKey", skip_all, fields(workspace_id, key_id))]
    async fn delete_key(
        &self,
        request: Request<DeleteKeyRequest>,
    ) -> Result<Response<DeleteKeyResponse>, Status> {
        let actor = actor(request.metadata())?;
        let (workspace, id) = {
            let key = request.get_ref();
            self.key_of(&request, &key.workspace_id, &key.key_id)?
        };
        self.keys.delete(&actor, &workspace, &id).await?;
        Ok(Response::new(DeleteKeyResponse {}))
    }

    #[tracing::instrument(name = "GetKey", skip_all, fields(workspace_id, key_id))]
    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<ApiKey>, Status> {
        actor(request.metadata())?;
        let (workspace, id) = {
            let key = request.get_ref();
            self.key_of(&request, &key.workspace_id, &key.key_id)?
        };
        let row = self.keys.get(&workspace, &id).await?;
        Ok(Response::new(api_key(row, self.keys.now())))
    }

    #[tracing::instrument(name = "UpdateKey", skip_all, fields(workspace_id, key_id))]
    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let actor = actor(request.metadata())?;
        let (workspace, id) = {
            let key = request.get_ref().key.as_ref();
            let field = |f: fn(&ApiKey) -> &str| key.map(f).unwrap_or_default();
            self.key_of(
                &request,
                field(|key| &key.workspace_id),
                field(|key| &key.id),
            )?
        };
        let request = request.into_inner();
        let key = request.key.unwrap_or_default();
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        let (mut name, mut scopes) = (false, false);
        if paths.is_empty() {
            // AIP-134: no mask means every field that is set.
            (name, scopes) = (!key.name.is_empty(), !key.scopes.is_empty());
        }
        for path in &paths {
            match path.as_str() {
                "name" => name = true,
                "scopes" => scopes = true,
                "*" => (name, scopes) = (true, true),
                _ => return Err(ApiError::from(InvalidInput::UpdateMaskInvalid).into()),
            }
        }
        let edit = KeyEdit {
            name: name
                .then(|| KeyName::parse(&key.name))
                .transpose()
                .map_err(ApiError::from)?,
            scopes: scopes
                .then(|| Scopes::parse(&key.scopes))
                .transpose()
                .map_err(ApiError::from)?,
        };
        let row = self.keys.update(&actor, &workspace, &id, edit).await?;
        Ok(Response::new(api_key(row, self.keys.now())))
    }

    #[tracing::instrument(name = "DisableKey", skip_all, fields(workspace_id, key_id))]
    async fn disable_key(
        &self,
        request: Request<DisableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let request = request.map(|r| (r.workspace_id, r.key_id));
        self.set_disabled(request, true).await
    }

    #[tracing::instrument(name = "EnableKey", skip_all, fields(workspace_id, key_id))]
    async fn enable_key(
        &self,
        request: Request<EnableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let request = request.map(|r| (r.workspace_id, r.key_id));
        self.set_disabled(request, false).await
    }

    #[tracing::instrument(name = "RotateKey", skip_all, fields(workspace_id, key_id, new_key_id))]
    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let actor = actor(request.metadata())?;
        let (workspace, id) = {
            let key = request.get_ref();
            self.key_of(&request, &key.workspace_id, &key.key_id)?
        };
        let request = request.into_inner();
        let grace = grace_period(request.grace_period).map_err(ApiError::from)?;
        let rotated = self.keys.rotate(&actor, &workspace, &id, grace).await?;
        tracing::Span::current().record("new_key_id", rotated.key.id.as_str());
        let now = self.keys.now();
        Ok(Response::new(RotateKeyResponse {
            key: Some(api_key(rotated.key, now)),
            secret: rotated.secret.expose().to_owned(),
            old_key: Some(api_key(rotated.old_key, now)),
        }))
    }

    async fn validate_key(
        &self,
        request: Request<ValidateKeyRequest>,
    ) -> Result<Response<ValidateKeyResponse>, Status> {
        self.validate_now(request.get_ref()).map(Response::new)
    }

    type ValidateKeysStream = Validations;

    #[tracing::instrument(name = "ValidateKeys", skip_all)]
    async fn validate_keys(
        &self,
        request: Request<Streaming<ValidateKeysRequest>>,
    ) -> Result<Response<Validations>, Status> {
        let draining = self.draining.clone().map(|mut draining| -> DrainFuture {
            Box::pin(async move {
                // An error means the server is gone, which is draining too.
                let _ = draining.wait_for(|draining| *draining).await;
            })
        });
        Ok(Response::new(Validations {
            service: self.clone(),
            requests: request.into_inner(),
            draining,
            since_drain_check: 0,
            ended: false,
        }))
    }

    #[tracing::instrument(name = "ListKeyEvents", skip_all, fields(workspace_id, key_id))]
    async fn list_key_events(
        &self,
        request: Request<ListKeyEventsRequest>,
    ) -> Result<Response<ListKeyEventsResponse>, Status> {
        actor(request.metadata())?;
        let workspace = self.workspace(&request, &request.get_ref().workspace_id)?;
        let request = request.into_inner();
        let key = match request.key_id.as_str() {
            "" => None,
            id => {
                let id = KeyId::parse(id).map_err(ApiError::from)?;
                tracing::Span::current().record("key_id", id.as_str());
                Some(id)
            }
        };
        let page_size = page_size(request.page_size)?;
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(
                EventCursor::decode(token, &workspace, key.as_ref())
                    .map_err(ApiError::from)?
                    .before,
            ),
        };
        let page = self
            .keys
            .events(&workspace, key.as_ref(), page_size, before)
            .await?;
        Ok(Response::new(ListKeyEventsResponse {
            events: page.events.into_iter().map(key_event).collect(),
            next_page_token: page
                .next
                .map(|before| EventCursor { before }.encode(&workspace, key.as_ref()))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "GetKeyUsage", skip_all, fields(workspace_id, key_id))]
    async fn get_key_usage(
        &self,
        request: Request<GetKeyUsageRequest>,
    ) -> Result<Response<GetKeyUsageResponse>, Status> {
        actor(request.metadata())?;
        let (workspace, id) = {
            let key = request.get_ref();
            self.key_of(&request, &key.workspace_id, &key.key_id)?
        };
        let request = request.into_inner();
        let (from_us, to_us) =
            usage_range(request.start_time, request.end_time).map_err(ApiError::from)?;
        let usage = self.keys.usage(&workspace, &id, from_us, to_us).await?;
        Ok(Response::new(GetKeyUsageResponse {
            buckets: usage
                .hours
                .into_iter()
                .map(|hour| {
                    let UsageCounts {
                        valid,
                        expired,
                        disabled,
                        deleted,
                        insufficient_scope,
                    } = hour.counts;
                    let count = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
                    UsageBucket {
                        start_time: Some(timestamp(hour.start_time_us)),
                        valid: count(valid),
                        expired: count(expired),
                        disabled: count(disabled),
                        deleted: count(deleted),
                        insufficient_scope: count(insufficient_scope),
                        distinct_client_ips: i64::try_from(hour.client_ips.estimate())
                            .unwrap_or(i64::MAX),
                    }
                })
                .collect(),
            last_used_time: usage.key.last_used_time.map(time),
            last_used_ip: usage
                .key
                .last_used_ip
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        }))
    }
}

/// The answers of a ValidateKeys stream: each request judged when it is read, so a key
/// deleted before then is never VALID. Polled only when the connection can take more
/// answers, so a client that stops reading stops being read from (HTTP/2 flow control does
/// the rest): nothing here buffers. The first error ends the stream.
pub struct Validations {
    service: ApiKeysService,
    requests: Streaming<ValidateKeysRequest>,
    /// Ready once the server drains: looked at whenever the client has nothing more for
    /// now, and every [`DRAIN_CHECK_EVERY`] requests of a client that never pauses.
    draining: Option<DrainFuture>,
    since_drain_check: u32,
    ended: bool,
}

type DrainFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

const DRAIN_CHECK_EVERY: u32 = 256;

impl Validations {
    /// Whether the server drains (and if not, a wake-up when it does).
    fn drained(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.since_drain_check = 0;
        self.draining
            .as_mut()
            .is_some_and(|draining| draining.as_mut().poll(cx).is_ready())
    }

    fn end_draining(&mut self) -> Status {
        self.ended = true;
        ApiError::ShuttingDown.into()
    }

    fn answer(&self, request: ValidateKeysRequest) -> Result<ValidateKeysResponse, Status> {
        let id = request.request_id;
        let request = request
            .request
            .ok_or(ApiError::RequestMissing)
            .map_err(|err| err.in_stream(id))?;
        let response = self
            .service
            .judge(&request)
            .map_err(|err| err.in_stream(id))?;
        Ok(ValidateKeysResponse {
            request_id: id,
            response: Some(response),
        })
    }
}

impl tokio_stream::Stream for Validations {
    type Item = Result<ValidateKeysResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        this.since_drain_check += 1;
        if this.since_drain_check >= DRAIN_CHECK_EVERY && this.drained(cx) {
            return Poll::Ready(Some(Err(this.end_draining())));
        }
        let answer = match std::pin::Pin::new(&mut this.requests).poll_next(cx) {
            Poll::Pending if this.drained(cx) => Err(this.end_draining()),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(request)) => request.and_then(|request| this.answer(request)),
        };
        self.ended = answer.is_err();
        Poll::Ready(Some(answer))
    }
}

impl std::fmt::Debug for Validations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validations").finish_non_exhaustive()
    }
}

/// A validation as the wire names it, counted in the metrics.
pub(crate) fn answered(validation: Validation, metrics: Option<&Metrics>) -> ValidationResult {
    if let Some(metrics) = metrics {
        metrics.validation(validation);
    }
    validation.into()
}

impl From<Validation> for ValidationResult {
    fn from(validation: Validation) -> Self {
        match validation {
            Validation::Valid => Self::Valid,
            Validation::Malformed => Self::Malformed,
            Validation::NotFound => Self::NotFound,
            Validation::Expired => Self::Expired,
            Validation::Disabled => Self::Disabled,
            Validation::Deleted => Self::Deleted,
            Validation::InsufficientScope => Self::InsufficientScope,
        }
    }
}

fn page_size(size: i32) -> Result<u64, ApiError> {
    match size {
        size if size < 0 => Err(InvalidInput::PageSizeNegative.into()),
        0 => Ok(DEFAULT_PAGE_SIZE),
        size => Ok(size as u64),
    }
}

/// `[start, end)` in microseconds, the start rounded down to its hour.
fn usage_range(
    start: Option<prost_types::Timestamp>,
    end: Option<prost_types::Timestamp>,
) -> Result<(i64, i64), InvalidInput> {
    let micros = |at: Option<prost_types::Timestamp>| {
        let at = at?;
        let nanos = u32::try_from(at.nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)?;
        Some(DateTime::from_timestamp(at.seconds, nanos)?.timestamp_micros())
    };
    let (Some(start), Some(end)) = (micros(start), micros(end)) else {
        return Err(InvalidInput::TimeRangeInvalid);
    };
    if start >= end || end - start > MAX_USAGE_RANGE_US {
        return Err(InvalidInput::TimeRangeInvalid);
    }
    Ok((hour_start(start), end))
}

fn key_event(event: crate::domain::KeyEvent) -> KeyEvent {
    let kind = match event.kind {
        EventKind::Created => KeyEventType::Created,
        EventKind::Updated => KeyEventType::Updated,
        EventKind::Disabled => KeyEventType::Disabled,
        EventKind::Enabled => KeyEventType::Enabled,
        EventKind::Rotated => KeyEventType::Rotated,
        EventKind::Deleted => KeyEventType::Deleted,
    };
    KeyEvent {
        id: format!("evt_{}", event.id),
        workspace_id: event.workspace.into(),
        key_id: event.key_id.into(),
        r#type: kind.into(),
        actor_id: event.actor_id,
        actor_role: event.actor_role,
        create_time: Some(time(event.time)),
        new_key_id: event.new_key_id.map(String::from).unwrap_or_default(),
        changed_fields: event.changed_fields,
    }
}

fn actor(metadata: &MetadataMap) -> Result<Actor, ApiError> {
    // One value or none: never the first of several (ActorError::Duplicated says why).
    let header = |name: &'static str| {
        let mut values = metadata.get_all(name).iter();
        let first = values.next();
        match values.next() {
            Some(_) => Err(crate::domain::ActorError::Duplicated(name)),
            None => Ok(first.and_then(|value| value.to_str().ok())),
        }
    };
    Ok(Actor::parse(
        header(ACTOR_ID_HEADER)?,
        header(ACTOR_ROLE_HEADER)?,
    )?)
}

/// Exactly one of a preset and a custom time.
fn expiry(preset: i32, custom: Option<prost_types::Timestamp>) -> Result<Expiry, InvalidInput> {
    match custom {
        None => expiration(preset).map(Expiry::Preset),
        Some(_) if preset != proto::Expiration::Unspecified as i32 => {
            Err(InvalidInput::ExpirationConflict)
        }
        Some(at) => {
            let nanos = u32::try_from(at.nanos)
                .ok()
                .filter(|nanos| *nanos < 1_000_000_000)
                .ok_or(InvalidInput::ExpireTimeInvalid)?;
            // Kept to the microsecond, as stored. Beyond chrono's range (±262,000 years) is
            // far in the past or the future.
            match DateTime::from_timestamp(at.seconds, nanos / 1000 * 1000) {
                Some(at) => Ok(Expiry::At(at)),
                None if at.seconds < 0 => Err(InvalidInput::ExpireTimeInPast),
                None => Err(InvalidInput::ExpireTimeTooFar),
            }
        }
    }
}

/// 0 to 7 days, kept to the microsecond; absent is 0.
fn grace_period(
    duration: Option<prost_types::Duration>,
) -> Result<chrono::TimeDelta, InvalidInput> {
    let duration = duration.unwrap_or_default();
    let grace = (duration.seconds >= 0 && (0..1_000_000_000).contains(&duration.nanos))
        .then(|| chrono::TimeDelta::new(duration.seconds, duration.nanos as u32 / 1000 * 1000))
        .flatten()
        .filter(|grace| *grace <= MAX_GRACE_PERIOD);
    grace.ok_or(InvalidInput::GracePeriodInvalid)
}

fn expiration(value: i32) -> Result<Expiration, InvalidInput> {
    match proto::Expiration::try_from(value) {
        Ok(proto::Expiration::Unspecified) => Err(InvalidInput::ExpirationUnspecified),
        Ok(proto::Expiration::Never) => Ok(Expiration::Never),
        Ok(proto::Expiration::Expiration30Days) => Ok(Expiration::Days30),
        Ok(proto::Expiration::Expiration90Days) => Ok(Expiration::Days90),
        Ok(proto::Expiration::Expiration1Year) => Ok(Expiration::OneYear),
        Err(_) => Err(InvalidInput::ExpirationUnknown),
    }
}

fn api_key(key: Key, now: DateTime<Utc>) -> ApiKey {
    let status = KeyStatus::from(key.status(now));
    ApiKey {
        masked_key: key.masked(),
        create_time: Some(time(key.create_time)),
        expire_time: key.expire_time.map(time),
        last_used_time: key.last_used_time.map(time),
        status: status.into(),
        scopes: key.scopes.into_vec(),
        id: key.id.into(),
        workspace_id: key.workspace.into(),
        name: key.name.into(),
        created_by: key.created_by,
    }
}

fn time(at: DateTime<Utc>) -> prost_types::Timestamp {
    timestamp(at.timestamp_micros())
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

impl From<crate::domain::KeyStatus> for KeyStatus {
    fn from(status: crate::domain::KeyStatus) -> Self {
        match status {
            crate::domain::KeyStatus::Active => Self::Active,
            crate::domain::KeyStatus::Disabled => Self::Disabled,
            crate::domain::KeyStatus::Expired => Self::Expired,
            // Never shown: the API answers NOT_FOUND for a deleted key.
            crate::domain::KeyStatus::Deleted => Self::Unspecified,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_own_proto_value_and_metric_label() {
        let mut seen = std::collections::HashSet::new();
        for validation in Validation::ALL {
            let result = ValidationResult::from(validation);
            assert!(seen.insert(result), "{validation:?}");
            assert_eq!(
                crate::observability::metrics::result_label(validation),
                result.as_str_name()
            );
        }
        // Every proto value but UNSPECIFIED is an answer.
        assert!(ValidationResult::try_from(seen.len() as i32 + 1).is_err());
    }
}
