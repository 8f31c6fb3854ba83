//! REST for templates and warm pools (docs/templates.md): nanobox's `/templates` with a build
//! status (a create answers 202 and the record says `building`, then `ready` or `failed`), and
//! `/pools/{template}`.

use crate::api::{ApiJson, ApiPath, AppState};
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hutch_core::template::{CreateTemplate, PoolView, SetPool, Template};

pub fn routes(r: Router<AppState>) -> Router<AppState> {
    r.route("/api/v1/templates", get(list).post(create))
        .route("/api/v1/templates/{name}", get(show).delete(remove))
        .route("/api/v1/templates/{name}/build", post(build))
        .route("/api/v1/pools", get(pools))
        .route(
            "/api/v1/pools/{template}",
            axum::routing::put(set_pool).delete(remove_pool),
        )
}

async fn list(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<Template>>, ApiError> {
    Ok(Json(m.templates_of(&caller).await?))
}

async fn create(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateTemplate>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(m.create_template(&caller, req).await?),
    ))
}

async fn show(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Template>, ApiError> {
    Ok(Json(m.template_for(&caller, &name).await?))
}

async fn remove(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.delete_template(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn build(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    Ok((
        StatusCode::ACCEPTED,
        Json(m.rebuild_template(&caller, &name).await?),
    ))
}

async fn pools(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<PoolView>>, ApiError> {
    Ok(Json(m.pools_of(&caller).await?))
}

async fn set_pool(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(template): ApiPath<String>,
    ApiJson(req): ApiJson<SetPool>,
) -> Result<Json<PoolView>, ApiError> {
    Ok(Json(m.set_pool(&caller, &template, req).await?))
}

async fn remove_pool(
    State(m): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(template): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    m.set_pool(
        &caller,
        &template,
        SetPool {
            min: 0,
            ..Default::default()
        },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
