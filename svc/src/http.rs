//! What the daemons' HTTP APIs share: every refusal is `{"error", "detail"}`
//! JSON (a stable label and what is wrong), the framework's own included.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// The body of every refusal.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorView {
    /// A stable label (`bad_request`, `no_route`, …): what clients key on.
    pub error: String,
    /// What is wrong, for people.
    pub detail: String,
}

/// A refusal: `status` with an [`ErrorView`].
pub fn refusal(status: StatusCode, error: &str, detail: &str) -> Response {
    (status, Json(ErrorView { error: error.into(), detail: detail.into() })).into_response()
}

/// A query string, refused as the API refuses (400 `bad_request`, JSON,
/// saying what is wrong) rather than as axum does (plain text).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(e) => Err(refusal(StatusCode::BAD_REQUEST, "bad_request", &e.body_text())),
        }
    }
}

/// Path parameters, refused as the API refuses (400 `bad_request`, JSON).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(e) => Err(refusal(StatusCode::BAD_REQUEST, "bad_request", &e.body_text())),
        }
    }
}

/// The answers to what no route takes, as JSON refusals: 404 `no_route`
/// for a path no route has, 405 `method_not_allowed` for a method a route
/// does not take. Call on the finished router.
pub fn with_json_fallbacks(app: Router) -> Router {
    app.fallback(|uri: axum::http::Uri| async move {
        refusal(StatusCode::NOT_FOUND, "no_route", &format!("no route for {}", uri.path()))
    })
    .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
        refusal(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &format!("{} does not take {method}", uri.path()))
    })
}
