use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use super::proto::{
    self, ApiKey, CreateKeyRequest, CreateKeyResponse, DeleteKeyRequest, DeleteKeyResponse,
    KeyStatus, ListKeysRequest, ListKeysResponse, ValidateKeyRequest, ValidateKeyResponse,
    ValidationResult, api_keys_server::ApiKeys,
};
use crate::{
    domain::{
        Actor, Expiration, InvalidInput, KeyId, KeyName, PageCursor, WorkspaceId, masked_key,
    },
    error::ApiError,
    index::KeyState,
    service::{DEFAULT_PAGE_SIZE, KeyService, Validation},
    store::KeyRow,
};

/// Metadata naming the person a management call acts for.
const ACTOR_ID_HEADER: &str = "x-actor-id";
const ACTOR_ROLE_HEADER: &str = "x-actor-role";
/// ValidateKey's request limit: ample for any key (junk below it is answered MALFORMED),
/// a quarter of what other calls may send.
pub const VALIDATE_MAX_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct ApiKeysService {
    keys: KeyService,
}

impl ApiKeysService {
    pub fn new(keys: KeyService) -> Self {
        Self { keys }
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
        let request = request.into_inner();
        let workspace = workspace(&request.workspace_id)?;
        let name = KeyName::parse(&request.name).map_err(ApiError::from)?;
        let expiration = expiration(request.expiration).map_err(ApiError::from)?;
        let (row, secret) = self
            .keys
            .create(&actor, &workspace, &name, expiration)
            .await?;
        tracing::Span::current().record("key_id", row.id.as_str());
        let now = self.keys.now();
        Ok(Response::new(CreateKeyResponse {
            key: Some(api_key(row, now)),
            secret: secret.expose().to_owned(),
        }))
    }

    #[tracing::instrument(name = "ListKeys", skip_all, fields(workspace_id))]
    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        actor(request.metadata())?;
        let request = request.into_inner();
        let workspace = workspace(&request.workspace_id)?;
        let page_size = match request.page_size {
            size if size < 0 => return Err(ApiError::from(InvalidInput::PageSizeNegative).into()),
            0 => DEFAULT_PAGE_SIZE,
            size => size as u64,
        };
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
            keys: page.keys.into_iter().map(|row| api_key(row, now)).collect(),
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
        let request = request.into_inner();
        let workspace = workspace(&request.workspace_id)?;
        let id = KeyId::parse(&request.key_id).map_err(ApiError::from)?;
        tracing::Span::current().record("key_id", id.as_str());
        self.keys.delete(&actor, &workspace, &id).await?;
        Ok(Response::new(DeleteKeyResponse {}))
    }

    #[tracing::instrument(name = "ValidateKey", skip_all, fields(result, key_id))]
    async fn validate_key(
        &self,
        request: Request<ValidateKeyRequest>,
    ) -> Result<Response<ValidateKeyResponse>, Status> {
        if prost::Message::encoded_len(request.get_ref()) > VALIDATE_MAX_BYTES {
            return Err(ApiError::RequestTooLarge {
                rpc: "ValidateKey",
                limit: VALIDATE_MAX_BYTES,
            }
            .into());
        }
        let outcome = self.keys.validate(&request.get_ref().key)?;
        let result = match outcome.result {
            Validation::Valid => ValidationResult::Valid,
            Validation::Malformed => ValidationResult::Malformed,
            Validation::NotFound => ValidationResult::NotFound,
            Validation::Expired => ValidationResult::Expired,
            Validation::Deleted => ValidationResult::Deleted,
        };
        let span = tracing::Span::current();
        span.record("result", result.as_str_name());
        let mut response = ValidateKeyResponse {
            valid: result == ValidationResult::Valid,
            result: result.into(),
            ..Default::default()
        };
        if let Some(found) = outcome.key {
            span.record("key_id", found.id.as_str());
            response.expire_time = found.expire_time_us.map(timestamp);
            response.key_id = found.id;
            response.workspace_id = found.workspace.to_string();
        }
        Ok(Response::new(response))
    }
}

fn actor(metadata: &MetadataMap) -> Result<Actor, ApiError> {
    let header = |name| metadata.get(name).and_then(|value| value.to_str().ok());
    Ok(Actor::parse(
        header(ACTOR_ID_HEADER),
        header(ACTOR_ROLE_HEADER),
    )?)
}

fn workspace(id: &str) -> Result<WorkspaceId, ApiError> {
    let workspace = WorkspaceId::parse(id)?;
    tracing::Span::current().record("workspace_id", workspace.as_str());
    Ok(workspace)
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

fn api_key(row: KeyRow, now: DateTime<Utc>) -> ApiKey {
    let expire_time_us = row.expire_time_us.unwrap_or(i64::MAX);
    // Listed keys are never deleted ones.
    let status = match KeyState::at(false, expire_time_us, now.timestamp_micros()) {
        KeyState::Expired => KeyStatus::Expired,
        _ => KeyStatus::Active,
    };
    ApiKey {
        masked_key: masked_key(&row.key_suffix),
        create_time: Some(timestamp(row.create_time_us)),
        expire_time: row.expire_time_us.map(timestamp),
        last_used_time: row.last_used_time_us.map(timestamp),
        status: status.into(),
        id: row.id,
        workspace_id: row.workspace_id,
        name: row.name,
        created_by: row.created_by,
    }
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}
