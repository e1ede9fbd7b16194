//! The ApiKeys service: each call's fields parsed into domain values, the key service
//! asked, its answer shown on the wire.

mod convert;
mod stream;

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use tracing::field::Empty;

use self::convert::{
    actor, api_key, credits, expiry, grace_period, key_event, page_size, rate_limit_asks,
    rate_limit_states, rate_limits, retry_after, time, timestamp, usage_range,
};
use self::stream::Validations;
use super::proto::{
    ApiKey, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse,
    DisableKeyRequest, EnableKeyRequest, GetKeyRequest, GetKeyUsageRequest, GetKeyUsageResponse,
    ListKeyEventsRequest, ListKeyEventsResponse, ListKeysRequest, ListKeysResponse,
    RotateKeyRequest, RotateKeyResponse, UpdateKeyRequest, UsageBucket, ValidateKeyRequest,
    ValidateKeyResponse, ValidateKeysRequest, ValidationResult, api_keys_server::ApiKeys,
};
use crate::{
    domain::{
        AllowedCidrs, Annotations, EventCursor, InvalidInput, KeyId, KeyName, OwnerId, PageCursor,
        Scopes, Validation, WorkspaceId, parse_credit_cost,
    },
    error::ApiError,
    grpc::guard::ManagementRate,
    index::LeaseCall,
    observability::{metrics::Metrics, telemetry},
    service::{KeyEdit, KeyService, KeyTerms, LEASE_ROUNDS, Validated},
    usage::UsageCounts,
};

/// ValidateKey's answer, or the credit lease it waits for.
// The answer is the common variant, moved by value: boxing it would allocate on every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Judgement {
    Answer(ValidateKeyResponse),
    Lease(LeaseCall),
}

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

    /// ValidateKey's answer to `request`, counted in metrics; or the credit lease it needs
    /// first (nothing judged or counted yet).
    fn judge(&self, request: &ValidateKeyRequest) -> Result<Judgement, ApiError> {
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
        let asks = rate_limit_asks(&request.rate_limits)?;
        let cost = parse_credit_cost(request.cost)?;
        let outcome = match self.keys.validate(
            &request.key,
            &request.required_scopes,
            client_ip,
            &asks,
            cost,
        )? {
            Validated::Answer(outcome) => outcome,
            Validated::Lease(call) => return Ok(Judgement::Lease(call)),
        };
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
            response.owner_id = found.owner_id;
            response.annotations = found.annotations;
            response.credits_remaining = found.credits_remaining;
            if !found.limits.states.is_empty() {
                response.rate_limits = rate_limit_states(&found.limits);
                response.retry_after = found.limits.retry_after_us.map(retry_after);
            }
        }
        Ok(Judgement::Answer(response))
    }

    /// ValidateKey, answered from memory: [`ApiKeysRoutes`](super::ApiKeysRoutes) calls it
    /// without a future, the generated server through [`ApiKeys::validate_key`]. A key with
    /// credits whose slice here cannot pay answers [`Judgement::Lease`]: then
    /// [`Self::validate_leasing`].
    pub(crate) fn validate_now(&self, request: &ValidateKeyRequest) -> Result<Judgement, Status> {
        // The one call on every gateway request: its span exists only for a trace exporter
        // (the log layer would keep one for every call at `info`, fields formatted, though
        // no event in it is ever logged).
        let span = telemetry::hot_span(|| {
            tracing::info_span!("ValidateKey", result = Empty, key_id = Empty)
        });
        let _entered = span.enter();
        let judgement = self.judge(request)?;
        if let Judgement::Answer(response) = &judgement
            && !span.is_none()
        {
            span.record("result", response.result().as_str_name());
            if !response.key_id.is_empty() {
                span.record("key_id", response.key_id.as_str());
            }
        }
        Ok(judgement)
    }

    /// ValidateKey for a request whose credits need `call` leased first: lease, judge again
    /// (another request may have spent the slice meanwhile, so a few rounds at most).
    pub(crate) async fn validate_leasing(
        &self,
        request: &ValidateKeyRequest,
        mut call: LeaseCall,
    ) -> Result<ValidateKeyResponse, ApiError> {
        for _ in 0..LEASE_ROUNDS {
            self.keys.lease(call).await?;
            match self.judge(request)? {
                Judgement::Answer(response) => return Ok(response),
                Judgement::Lease(next) => call = next,
            }
        }
        Err(ApiError::CreditsBusy)
    }

    /// Counts ValidateKey answers by result in `metrics`.
    pub(crate) fn with_metrics(self, metrics: Option<Arc<Metrics>>) -> Self {
        Self { metrics, ..self }
    }

    /// Ends ValidateKeys streams (UNAVAILABLE, `SHUTTING_DOWN`) once `draining` turns true.
    pub(crate) fn with_draining(self, draining: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            draining: Some(draining),
            ..self
        }
    }

    /// DisableKey and EnableKey: the workspace, key and etag.
    async fn set_disabled(
        &self,
        request: Request<(String, String, String)>,
        disabled: bool,
    ) -> Result<Response<ApiKey>, Status> {
        let actor = actor(request.metadata())?;
        let (workspace_id, key_id, etag) = request.get_ref();
        let (workspace, id) = self.key_of(&request, workspace_id, key_id)?;
        let row = self
            .keys
            .set_disabled(&actor, &workspace, &id, disabled, etag)
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
        let terms = KeyTerms {
            scopes: Scopes::parse(&request.scopes).map_err(ApiError::from)?,
            owner_id: OwnerId::parse(&request.owner_id).map_err(ApiError::from)?,
            annotations: Annotations::parse(&request.annotations).map_err(ApiError::from)?,
            allowed_cidrs: AllowedCidrs::parse(&request.allowed_cidrs).map_err(ApiError::from)?,
            rate_limits: rate_limits(&request.rate_limits).map_err(ApiError::from)?,
            credits: credits(request.credits.as_ref()).map_err(ApiError::from)?,
        };
        let (key, secret) = self
            .keys
            .create(&actor, &workspace, &name, expiry, terms)
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
        let owner = OwnerId::parse(&request.owner_id).map_err(ApiError::from)?;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(PageCursor::decode(token, &workspace, &owner).map_err(ApiError::from)?),
        };
        let page = self
            .keys
            .list(&workspace, &owner, page_size, after.as_ref())
            .await?;
        let now = self.keys.now();
        Ok(Response::new(ListKeysResponse {
            keys: page.keys.into_iter().map(|key| api_key(key, now)).collect(),
            next_page_token: page
                .next
                .map(|cursor| cursor.encode(&workspace, &owner))
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
        self.keys
            .delete(&actor, &workspace, &id, &request.get_ref().etag)
            .await?;
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
        let mask = UpdateMask::of(&paths, &key)?;
        let edit = KeyEdit {
            name: mask
                .name
                .then(|| KeyName::parse(&key.name))
                .transpose()
                .map_err(ApiError::from)?,
            scopes: mask
                .scopes
                .then(|| Scopes::parse(&key.scopes))
                .transpose()
                .map_err(ApiError::from)?,
            owner_id: mask
                .owner_id
                .then(|| OwnerId::parse(&key.owner_id))
                .transpose()
                .map_err(ApiError::from)?,
            annotations: mask
                .annotations
                .then(|| Annotations::parse(&key.annotations))
                .transpose()
                .map_err(ApiError::from)?,
            allowed_cidrs: mask
                .allowed_cidrs
                .then(|| AllowedCidrs::parse(&key.allowed_cidrs))
                .transpose()
                .map_err(ApiError::from)?,
            rate_limits: mask
                .rate_limits
                .then(|| rate_limits(&key.rate_limits))
                .transpose()
                .map_err(ApiError::from)?,
            credits: mask
                .credits
                .then(|| credits(key.credits.as_ref()))
                .transpose()
                .map_err(ApiError::from)?,
        };
        let row = self
            .keys
            .update(&actor, &workspace, &id, edit, &key.etag)
            .await?;
        Ok(Response::new(api_key(row, self.keys.now())))
    }

    #[tracing::instrument(name = "DisableKey", skip_all, fields(workspace_id, key_id))]
    async fn disable_key(
        &self,
        request: Request<DisableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let request = request.map(|r| (r.workspace_id, r.key_id, r.etag));
        self.set_disabled(request, true).await
    }

    #[tracing::instrument(name = "EnableKey", skip_all, fields(workspace_id, key_id))]
    async fn enable_key(
        &self,
        request: Request<EnableKeyRequest>,
    ) -> Result<Response<ApiKey>, Status> {
        let request = request.map(|r| (r.workspace_id, r.key_id, r.etag));
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
        let rotated = self
            .keys
            .rotate(&actor, &workspace, &id, grace, &request.etag)
            .await?;
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
        match self.validate_now(request.get_ref())? {
            Judgement::Answer(response) => Ok(Response::new(response)),
            Judgement::Lease(call) => self
                .validate_leasing(request.get_ref(), call)
                .await
                .map(Response::new)
                .map_err(Status::from),
        }
    }

    type ValidateKeysStream = Validations;

    #[tracing::instrument(name = "ValidateKeys", skip_all)]
    async fn validate_keys(
        &self,
        request: Request<Streaming<ValidateKeysRequest>>,
    ) -> Result<Response<Validations>, Status> {
        Ok(Response::new(Validations::new(
            self.clone(),
            request.into_inner(),
            self.draining.clone(),
        )))
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
        let (from_us, to_us) = usage_range(request.start_time, request.end_time, self.keys.now())
            .map_err(ApiError::from)?;
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
                        ip_not_allowed,
                        rate_limited,
                        usage_exceeded,
                    } = hour.counts;
                    let count = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
                    UsageBucket {
                        start_time: Some(timestamp(hour.start_time_us)),
                        valid: count(valid),
                        expired: count(expired),
                        disabled: count(disabled),
                        deleted: count(deleted),
                        insufficient_scope: count(insufficient_scope),
                        ip_not_allowed: count(ip_not_allowed),
                        rate_limited: count(rate_limited),
                        usage_exceeded: count(usage_exceeded),
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

/// The fields an UpdateKey changes (AIP-134).
#[derive(Debug, Default)]
struct UpdateMask {
    name: bool,
    scopes: bool,
    owner_id: bool,
    annotations: bool,
    allowed_cidrs: bool,
    rate_limits: bool,
    credits: bool,
}

impl UpdateMask {
    /// The mask's paths; with none, every field of `key` that is set.
    fn of(paths: &[String], key: &ApiKey) -> Result<Self, ApiError> {
        if paths.is_empty() {
            return Ok(Self {
                name: !key.name.is_empty(),
                scopes: !key.scopes.is_empty(),
                owner_id: !key.owner_id.is_empty(),
                annotations: !key.annotations.is_empty(),
                allowed_cidrs: !key.allowed_cidrs.is_empty(),
                rate_limits: !key.rate_limits.is_empty(),
                credits: key.credits.is_some(),
            });
        }
        let mut mask = Self::default();
        for path in paths {
            match path.as_str() {
                "name" => mask.name = true,
                "scopes" => mask.scopes = true,
                "owner_id" => mask.owner_id = true,
                "annotations" => mask.annotations = true,
                "allowed_cidrs" => mask.allowed_cidrs = true,
                "rate_limits" => mask.rate_limits = true,
                "credits" => mask.credits = true,
                "*" => {
                    mask = Self {
                        name: true,
                        scopes: true,
                        owner_id: true,
                        annotations: true,
                        allowed_cidrs: true,
                        rate_limits: true,
                        credits: true,
                    }
                }
                _ => return Err(InvalidInput::UpdateMaskInvalid.into()),
            }
        }
        Ok(mask)
    }
}

/// A validation as the wire names it, counted in the metrics.
pub(crate) fn answered(validation: Validation, metrics: Option<&Metrics>) -> ValidationResult {
    if let Some(metrics) = metrics {
        metrics.validation(validation);
    }
    validation.into()
}
