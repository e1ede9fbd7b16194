//! Envoy's external authorization protocol (`envoy.service.auth.v3.Authorization/Check`) on
//! the service's own port, so Envoy and Istio validate Cloodot keys by configuration alone.
//! Same index, same usage recording and same speed as ValidateKey; every decision is a
//! `CheckResponse`, never an RPC error (Envoy would apply its `failure_mode_allow` to one).

mod request;
mod response;

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::HttpStatusCode;
use serde_json::json;
use tonic::{Code, Status};
use tracing::field::Empty;

use self::{request::AttributeContext, response::header};
pub(crate) use self::{request::CheckRequest, response::CheckResponse};

use crate::{
    domain::{CheckDecision, InvalidInput, LimitJudgement, RateLimitAsk, Validation, ceil_div},
    error::ApiError,
    index::LeaseCall,
    observability::metrics::Metrics,
    observability::telemetry,
    service::{KeyService, LEASE_ROUNDS, Validated},
};

/// The upstream headers' names after their prefix: the key that was accepted, its owner,
/// and each forwarded annotation after `annotation-`.
const KEY_ID_HEADER: &str = "key-id";
const WORKSPACE_ID_HEADER: &str = "workspace-id";
const KEY_SCOPES_HEADER: &str = "key-scopes";
const OWNER_ID_HEADER: &str = "owner-id";
const ANNOTATION_HEADER: &str = "annotation-";
/// The default prefix of every upstream header.
pub const DEFAULT_HEADER_PREFIX: &str = "x-cloodot-";
/// The per-route `context_extensions` entry listing the scopes a route needs.
pub(crate) const REQUIRED_SCOPES_EXTENSION: &str = "required_scopes";
/// The per-route `context_extensions` entry naming the rate limits a route spends from:
/// `name` or `name=cost`, separated by commas.
pub(crate) const RATE_LIMITS_EXTENSION: &str = "rate_limits";
/// The per-route `context_extensions` entry saying what a request costs from a key's
/// credits: a whole number from 0 (absent: 1).
pub(crate) const COST_EXTENSION: &str = "cost";
/// Where proxies in front of the gateway name the client.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// How gateways present keys, where the client's address is read from, and what goes
/// upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Headers that may carry the key, in order of preference, lower case. `authorization`
    /// is read as `Bearer <key>`; any other header holds the key itself.
    pub key_headers: Vec<String>,
    /// Remove the header that carried the key before the request goes upstream, so the
    /// backend never sees it (like Kong's `hide_credentials`).
    pub hide_credentials: bool,
    /// How many proxies in front of the gateway append to `x-forwarded-for` and are trusted:
    /// 0, the client is the Check's source address; N, it is the Nth address from the right
    /// of `x-forwarded-for` (none when the header holds fewer).
    pub trusted_hops: usize,
    /// The prefix of every upstream header (`x-cloodot-` gives `x-cloodot-key-id`), lower case.
    pub header_prefix: String,
    /// Annotations sent upstream as `<prefix>annotation-<key>`: annotation keys without ':'
    /// (not allowed in a header name).
    pub forward_annotations: Vec<String>,
}

/// The upstream headers' full names, made once.
#[derive(Debug)]
struct UpstreamHeaders {
    key_id: Bytes,
    workspace_id: Bytes,
    key_scopes: Bytes,
    owner_id: Bytes,
    /// Each forwarded annotation's key and header.
    annotations: Vec<(String, Bytes)>,
}

impl UpstreamHeaders {
    fn new(settings: &GatewaySettings) -> Self {
        let name = |suffix: &str| Bytes::from(format!("{}{suffix}", settings.header_prefix));
        Self {
            key_id: name(KEY_ID_HEADER),
            workspace_id: name(WORKSPACE_ID_HEADER),
            key_scopes: name(KEY_SCOPES_HEADER),
            owner_id: name(OWNER_ID_HEADER),
            // Once each: a second entry would find the value taken and remove the header.
            annotations: settings
                .forward_annotations
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|key| (key.clone(), name(&format!("{ANNOTATION_HEADER}{key}"))))
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExtAuthzService {
    keys: KeyService,
    settings: Arc<GatewaySettings>,
    /// `settings.key_headers`, as a response names the one to remove.
    key_headers: Arc<[Bytes]>,
    upstream: Arc<UpstreamHeaders>,
    metrics: Option<Arc<Metrics>>,
}

impl ExtAuthzService {
    pub fn new(keys: KeyService, settings: GatewaySettings, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            keys,
            key_headers: settings
                .key_headers
                .iter()
                .map(|name| Bytes::from(name.clone()))
                .collect(),
            upstream: Arc::new(UpstreamHeaders::new(&settings)),
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// The client's address: the Check's source, or the address the outermost trusted proxy
    /// saw in `x-forwarded-for`. `None` when it cannot be told (no source address, fewer
    /// addresses than trusted hops, or one that is not an IP).
    fn client_ip(&self, attributes: &AttributeContext) -> Option<IpAddr> {
        let hops = self.settings.trusted_hops;
        if hops == 0 {
            return attributes.client_ip();
        }
        let forwarded = attributes.header_lines(FORWARDED_FOR);
        let entry = forwarded
            .iter()
            .rev()
            .flat_map(|line| line.rsplit(|&byte| byte == b','))
            .nth(hops - 1)?;
        std::str::from_utf8(entry).ok()?.trim().parse().ok()
    }

    /// The key and the header it came in, by the configured order. A value that is not
    /// UTF-8 is read lossily: it cannot be a key, and is refused as a malformed one.
    fn presented<'a>(
        &'a self,
        attributes: &'a AttributeContext,
    ) -> Option<(&'a Bytes, Cow<'a, str>)> {
        let names = self
            .settings
            .key_headers
            .iter()
            .zip(self.key_headers.iter());
        names.into_iter().find_map(|(name, header)| {
            let value = attributes.header(name)?.trim_ascii();
            let key = if name == "authorization" {
                // Another scheme (Basic, a JWT's own Bearer is still Bearer) is not ours.
                let space = value.iter().position(|&byte| byte == b' ')?;
                let (scheme, rest) = value.split_at(space);
                scheme
                    .eq_ignore_ascii_case(b"bearer")
                    .then(|| rest.trim_ascii())?
            } else {
                value
            };
            let key = match std::str::from_utf8(key) {
                Ok(key) => Cow::Borrowed(key),
                Err(_) => String::from_utf8_lossy(key),
            };
            Some((header, key))
        })
    }

    /// The decision on one request, counted: every outcome is a `CheckResponse`. Or, for a
    /// key with credits whose slice here cannot pay, the lease to take first (nothing
    /// decided or counted yet): then [`Self::decide_leasing`].
    pub(crate) fn decide(&self, request: &CheckRequest) -> Result<CheckResponse, LeaseCall> {
        let (response, decision) = self.decision(request)?;
        if let Some(metrics) = &self.metrics {
            metrics.check_decision(decision);
        }
        Ok(response)
    }

    /// [`Self::decide`] once `call` is leased (a few rounds at most, as for ValidateKey).
    pub(crate) async fn decide_leasing(
        &self,
        request: &CheckRequest,
        mut call: LeaseCall,
    ) -> CheckResponse {
        for _ in 0..LEASE_ROUNDS {
            if let Err(err) = self.keys.lease(call).await {
                return self.counted(cannot_decide(err));
            }
            match self.decide(request) {
                Ok(response) => return response,
                Err(next) => call = next,
            }
        }
        self.counted(cannot_decide(ApiError::CreditsBusy))
    }

    fn counted(&self, (response, decision): (CheckResponse, CheckDecision)) -> CheckResponse {
        if let Some(metrics) = &self.metrics {
            metrics.check_decision(decision);
        }
        response
    }

    fn decision(
        &self,
        request: &CheckRequest,
    ) -> Result<(CheckResponse, CheckDecision), LeaseCall> {
        let absent = AttributeContext::default();
        let attributes = request.attributes.as_ref().unwrap_or(&absent);
        // As ValidateKey's: a span only for a trace exporter.
        let span =
            telemetry::hot_span(|| tracing::info_span!("Check", result = Empty, key_id = Empty));
        let _entered = span.enter();
        let Some((header, key)) = self.presented(attributes) else {
            span.record("result", "MISSING");
            let decision = CheckDecision::MissingKey;
            return Ok((unauthenticated(decision.reason(), None), decision));
        };
        let required: Vec<&str> = match attributes.context_extension(REQUIRED_SCOPES_EXTENSION) {
            None => Vec::new(),
            Some(Ok(scopes)) => scopes
                .split(',')
                .map(str::trim)
                .filter(|scope| !scope.is_empty())
                .collect(),
            Some(Err(())) => return Ok(route_misconfigured(REQUIRED_SCOPES_EXTENSION)),
        };
        let asks = match attributes.context_extension(RATE_LIMITS_EXTENSION) {
            None => Vec::new(),
            Some(Ok(limits)) => match route_rate_limits(limits) {
                Some(asks) => asks,
                None => return Ok(route_misconfigured(RATE_LIMITS_EXTENSION)),
            },
            Some(Err(())) => return Ok(route_misconfigured(RATE_LIMITS_EXTENSION)),
        };
        let cost = match attributes.context_extension(COST_EXTENSION) {
            None => 1,
            Some(Ok(cost)) => match cost.trim().parse::<i64>() {
                Ok(cost) if cost >= 0 => cost,
                _ => return Ok(route_misconfigured(COST_EXTENSION)),
            },
            Some(Err(())) => return Ok(route_misconfigured(COST_EXTENSION)),
        };
        let outcome =
            match self
                .keys
                .validate(&key, &required, self.client_ip(attributes), &asks, cost)
            {
                Ok(Validated::Answer(outcome)) => outcome,
                Ok(Validated::Lease(call)) => return Err(call),
                Err(ApiError::InvalidInput(InvalidInput::RequiredScopesInvalid)) => {
                    return Ok(route_misconfigured(REQUIRED_SCOPES_EXTENSION));
                }
                Err(ApiError::InvalidInput(
                    InvalidInput::RateLimitNameInvalid
                    | InvalidInput::TooManyRateLimits
                    | InvalidInput::CostInvalid,
                )) => {
                    return Ok(route_misconfigured(RATE_LIMITS_EXTENSION));
                }
                Err(err) => return Ok(cannot_decide(err)),
            };
        let result = super::api_keys::answered(outcome.result, self.metrics.as_deref());
        span.record("result", result.as_str_name());
        if let Some(found) = &outcome.key {
            span.record("key_id", found.id.as_str());
        }
        let refused = CheckDecision::Refused(outcome.result);
        let reason = refused.reason();
        let response = match (outcome.result, outcome.key) {
            (Validation::Valid, Some(found)) => {
                let upstream = &*self.upstream;
                // Room for every header each list may get, so neither grows while it fills:
                // the key's header, scopes, owner and each forwarded annotation.
                let optional = 2 + upstream.annotations.len();
                let mut remove = Vec::with_capacity(1 + optional);
                if self.settings.hide_credentials {
                    remove.push(header.clone());
                }
                let scopes = (!found.scopes.is_empty()).then(|| found.scopes.join(","));
                let mut headers = Vec::with_capacity(2 + optional);
                headers.push(response::named_header(upstream.key_id.clone(), found.id));
                headers.push(response::named_header(
                    upstream.workspace_id.clone(),
                    found.workspace,
                ));
                // A client's own value never reaches the backend: overwritten or removed.
                let mut set = |name: &Bytes, value: Option<String>| match value {
                    Some(value) => headers.push(response::named_header(name.clone(), value)),
                    None => remove.push(name.clone()),
                };
                set(&upstream.key_scopes, scopes);
                let owner = (!found.owner_id.is_empty()).then_some(found.owner_id);
                set(&upstream.owner_id, owner);
                let mut annotations = found.annotations;
                for (key, name) in &upstream.annotations {
                    set(name, annotations.remove(key));
                }
                // The client learns where its limits stand, as on a 429.
                let downstream = rate_limit_headers(&found.limits);
                return Ok((
                    CheckResponse::allowed(headers, remove, downstream),
                    CheckDecision::Allowed,
                ));
            }
            (Validation::RateLimited, found) => {
                let limits = found.map(|found| found.limits).unwrap_or_default();
                let mut response = denied(
                    Code::ResourceExhausted,
                    HttpStatusCode::TooManyRequests,
                    json!({"error": "rate_limited", "reason": reason}),
                    None,
                );
                let mut extra = rate_limit_headers(&limits);
                // Whole seconds, rounded up: the request fits once every limit that refused
                // it starts a new window. None when it never fits (it costs more than a limit
                // allows in a whole window).
                if let Some(wait) = limits.retry_after_us {
                    let seconds = ceil_div(wait.max(1), 1_000_000);
                    extra.push(response::header("retry-after", seconds.to_string()));
                }
                response.add_headers(extra);
                response
            }
            (Validation::UsageExceeded, found) => {
                let limits = found.map(|found| found.limits).unwrap_or_default();
                let mut response = denied(
                    Code::ResourceExhausted,
                    HttpStatusCode::TooManyRequests,
                    json!({"error": "usage_exceeded", "reason": reason}),
                    None,
                );
                // No Retry-After: only a refill or an admin adds credits.
                response.add_headers(rate_limit_headers(&limits));
                response
            }
            (Validation::IpNotAllowed, _) => denied(
                Code::PermissionDenied,
                HttpStatusCode::Forbidden,
                json!({"error": "ip_not_allowed", "reason": reason}),
                None,
            ),
            (Validation::InsufficientScope, _) => denied(
                Code::PermissionDenied,
                HttpStatusCode::Forbidden,
                json!({"error": "insufficient_scope", "reason": reason}),
                Some(format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                    required.join(" ")
                )),
            ),
            // VALID always comes with its key; without one, fail closed.
            (
                Validation::Valid
                | Validation::Malformed
                | Validation::NotFound
                | Validation::Expired
                | Validation::Disabled
                | Validation::Deleted,
                _,
            ) => unauthenticated(reason, Some("invalid_token")),
        };
        Ok((response, refused))
    }
}

/// Fail closed: a stale index, an unreachable database (or anything else) never lets a
/// request through.
fn cannot_decide(err: ApiError) -> (CheckResponse, CheckDecision) {
    let status = Status::from(err);
    tracing::warn!(code = ?status.code(), "cannot decide; denying");
    let decision = CheckDecision::Unavailable;
    let response = denied(
        Code::Unavailable,
        HttpStatusCode::ServiceUnavailable,
        json!({"error": "temporarily_unavailable", "reason": decision.reason()}),
        None,
    );
    (response, decision)
}

/// A route's `context_extensions` entry `rate_limits`: `name` or `name=cost` (a whole number
/// from 0), separated by commas; `None` when it is not.
fn route_rate_limits(entry: &str) -> Option<Vec<RateLimitAsk<'_>>> {
    entry
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, cost) = match entry.split_once('=') {
                Some((name, cost)) => (name.trim(), Some(cost.trim().parse().ok()?)),
                None => (entry, None),
            };
            RateLimitAsk::parse(name, cost).ok()
        })
        .collect()
}

/// The IETF draft's `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-
/// ratelimit-headers): each limit judged, its quota and window, what is left and the
/// seconds until its window ends. None when no limit was judged.
fn rate_limit_headers(limits: &LimitJudgement) -> Vec<response::HeaderValueOption> {
    if limits.states.is_empty() {
        return Vec::new();
    }
    let mut policy = String::new();
    let mut current = String::new();
    for state in &limits.states {
        use std::fmt::Write as _;
        let separator = if policy.is_empty() { "" } else { ", " };
        let _ = write!(
            policy,
            "{separator}\"{}\";q={};w={}",
            state.name,
            state.limit,
            state.window_ms / 1_000
        );
        let _ = write!(
            current,
            "{separator}\"{}\";r={};t={}",
            state.name,
            state.remaining,
            ceil_div((state.reset_us - limits.now_us).max(0), 1_000_000)
        );
    }
    vec![
        header("ratelimit-policy", policy),
        header("ratelimit", current),
    ]
}

/// A route whose `context_extensions` entry `extension` is not what it must be: the
/// gateway's configuration is at fault, whatever the key.
fn route_misconfigured(extension: &'static str) -> (CheckResponse, CheckDecision) {
    tracing::error!(
        extension,
        "a route's context_extensions entry is not well-formed; denying"
    );
    let decision = CheckDecision::RouteMisconfigured;
    let response = denied(
        Code::Internal,
        HttpStatusCode::InternalServerError,
        json!({"error": "server_error", "reason": decision.reason()}),
        None,
    );
    (response, decision)
}

/// 401 with RFC 6750's challenge: bare when no key was presented, `error="invalid_token"`
/// when the key is not accepted.
fn unauthenticated(reason: &str, error: Option<&str>) -> CheckResponse {
    let challenge = match error {
        Some(error) => format!("Bearer error=\"{error}\""),
        None => "Bearer".to_owned(),
    };
    denied(
        Code::Unauthenticated,
        HttpStatusCode::Unauthorized,
        json!({"error": error.unwrap_or("invalid_request"), "reason": reason}),
        Some(challenge),
    )
}

fn denied(
    code: Code,
    http: HttpStatusCode,
    body: serde_json::Value,
    challenge: Option<String>,
) -> CheckResponse {
    let mut headers = vec![header("content-type", "application/json")];
    if let Some(challenge) = challenge {
        headers.push(header("www-authenticate", challenge));
    }
    CheckResponse::denied(code, http as i32, headers, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::proto::ValidationResult;

    #[test]
    fn a_denial_reason_is_the_result_name_in_lower_case() {
        for validation in Validation::ALL {
            let name = ValidationResult::from(validation).as_str_name();
            let expected = name
                .trim_start_matches("VALIDATION_RESULT_")
                .to_ascii_lowercase();
            assert_eq!(
                CheckDecision::Refused(validation).reason(),
                expected,
                "{name}"
            );
        }
    }
}
