//! The admin API's node and key routes: status, labels, cordon, drain, flip, removal, API
//! keys.

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use pd_api::{
    ApiKeyCreated, ApiKeyInfo, ApiKeyRequest, ApiKeys, Changed, FlipRequest, Flipped,
    FlippedEngine, LabelRequest, RequiredRequest, Status,
};
use pd_raft::{AdminState, Command};

use super::{AdminCtx, ApiError, Ctx, WriteError, done};

/// Makes a key, stores only its hash, and answers the key itself: the only time it is shown.
pub(super) async fn create_api_key(
    State(ctx): Ctx,
    Json(body): Json<ApiKeyRequest>,
) -> Result<Json<ApiKeyCreated>, WriteError> {
    let (id, key, hash) = crate::serving::apikey::generate()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no_randomness", e))?;
    let created_unix = crate::util::now_unix();
    ctx.write(Command::CreateApiKey {
        id: id.clone(),
        name: body.name.clone(),
        sha256_hex: hash,
        created_unix,
    })
    .await?;
    Ok(Json(ApiKeyCreated {
        id,
        name: body.name,
        key,
        created_unix,
    }))
}

/// The keys, without their secrets or hashes.
pub(super) async fn api_keys(State(ctx): Ctx) -> Json<ApiKeys> {
    Json(ctx.control.read_state(|s| {
        ApiKeys {
            api_keys: s
                .api_keys
                .values()
                .map(|k| ApiKeyInfo {
                    id: k.id.clone(),
                    name: k.name.clone(),
                    created_unix: k.created_unix,
                })
                .collect(),
            required: s.api_keys_required,
        }
    }))
}

pub(super) async fn require_api_keys(
    State(ctx): Ctx,
    Json(body): Json<RequiredRequest>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::RequireApiKeys {
        required: body.required,
    })
    .await
    .map(done)
}

pub(super) async fn revoke_api_key(
    State(ctx): Ctx,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::RevokeApiKey { id }).await.map(done)
}

/// The status, with each node's latest GPU telemetry (`telemetry`: `age_ms` and `gpus`, or
/// null when the coordinator has not heard from the node).
pub(super) async fn status(State(ctx): Ctx) -> Json<Status> {
    let telemetry = ctx.coordinator.cluster_telemetry().await;
    Json(Status::of(
        ctx.control.status(),
        &telemetry,
        ctx.coordinator.voters_short(),
    ))
}

pub(super) async fn set_label(
    State(ctx): Ctx,
    UrlPath((node, key)): UrlPath<(String, String)>,
    Json(body): Json<LabelRequest>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::SetLabel {
        node,
        key,
        value: Some(body.value),
    })
    .await
    .map(done)
}

pub(super) async fn delete_label(
    State(ctx): Ctx,
    UrlPath((node, key)): UrlPath<(String, String)>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::SetLabel {
        node,
        key,
        value: None,
    })
    .await
    .map(done)
}

async fn set_admin_state(
    ctx: &AdminCtx,
    node: String,
    state: AdminState,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::SetAdminState { node, state })
        .await
        .map(done)
}

pub(super) async fn cordon(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Cordoned).await
}

pub(super) async fn uncordon(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Active).await
}

pub(super) async fn drain(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    set_admin_state(&ctx, node, AdminState::Draining).await
}

/// The node's engines change role; answers with the engines now on the node.
pub(super) async fn flip(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
    Json(body): Json<FlipRequest>,
) -> Result<Json<Flipped>, WriteError> {
    let role = match body.role.as_str() {
        "prefill" => pd_raft::EngineRole::Prefill,
        "decode" => pd_raft::EngineRole::Decode,
        other => {
            return Err(WriteError::from(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid_role",
                format!("role {other:?}: a node flips to \"prefill\" or \"decode\""),
            )));
        }
    };
    ctx.write(Command::FlipNode {
        node: node.clone(),
        role,
    })
    .await?;
    let engines = ctx.control.read_state(|s| {
        s.assignments
            .values()
            .filter(|a| a.node == node)
            .map(|a| FlippedEngine {
                engine: a.engine.clone(),
                role: a.role.to_string(),
                gpus: a.gpus.clone(),
                generation: a.generation,
            })
            .collect()
    });
    Ok(Json(Flipped {
        changed: true,
        engines,
    }))
}

pub(super) async fn remove(
    State(ctx): Ctx,
    UrlPath(node): UrlPath<String>,
) -> Result<Json<Changed>, WriteError> {
    ctx.write(Command::RemoveNode {
        node,
        cert_serial: None,
    })
    .await
    .map(done)
}
