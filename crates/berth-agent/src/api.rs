//! The `/v1` HTTP/JSON API (documented in docs/api.md).
//!
//! Bodies are taken as bytes and parsed here, so that a missing Content-Type is accepted and a
//! malformed body gets the same `{"error": ...}` shape as every other failure.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_api::{
    Attach, CreateNetwork, CreateSandbox, CreateService, Detach, ErrorBody, Gc, MAX_BODY, Policy,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Agent, AgentError};

type Shared = State<Arc<Agent>>;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("request failed: {self}");
        } else {
            tracing::info!("refused ({}): {self}", status.as_u16());
        }
        (
            status,
            axum::Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

fn ok<T: Serialize>(status: StatusCode, v: T) -> Response {
    (status, axum::Json(v)).into_response()
}

/// axum answers some failures itself, before any handler runs, with a plain-text or empty body:
/// a method a path does not have (405), a body over [`MAX_BODY`] (413). Every failure has the
/// one shape docs/api.md documents, so those are rewritten as `{"error": ...}`.
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let error = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("method {method} is not allowed on {path} (see docs/api.md)")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body too large: at most {MAX_BODY} bytes")
        }
        _ => {
            let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&text).trim().to_string();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text
            }
        }
    };
    let mut out = (status, axum::Json(ErrorBody { error })).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, AgentError> {
    serde_json::from_slice(body)
        .map_err(|e| AgentError::Invalid(format!("invalid request body: {e}")))
}

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(delete_network),
        )
        .route("/v1/networks/{name}/allocations", get(allocations))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route(
            "/v1/sandboxes/{name}",
            get(get_sandbox).delete(delete_sandbox),
        )
        .route("/v1/endpoints", get(list_endpoints).post(attach))
        .route(
            "/v1/endpoints/{id}",
            get(get_endpoint).delete(delete_endpoint),
        )
        .route("/v1/endpoints/{id}/check", get(check))
        .route(
            "/v1/networks/{name}/containers/{cid}/{ifname}",
            get(container_endpoint),
        )
        .route("/v1/services", get(list_services).post(create_service))
        .route(
            "/v1/services/{name}",
            get(get_service).delete(delete_service),
        )
        .route(
            "/v1/policies",
            get(list_policies).post(create_policy).put(apply_policies),
        )
        .route(
            "/v1/policies/{name}",
            get(get_policy).put(apply_policy).delete(delete_policy),
        )
        .route("/v1/explain", get(explain_policy))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{id}", axum::routing::delete(remove_host))
        .route("/v1/detach", post(detach))
        .route("/v1/gc", post(gc))
        .fallback(|| async {
            AgentError::NotFound("no such API path (see docs/api.md)".into()).into_response()
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(agent)
}

async fn status(State(a): Shared) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.status().await?))
}

async fn list_networks(State(a): Shared) -> Result<Response, AgentError> {
    let mut docker = a.docker_networks_by_network().await?;
    let nets: Vec<_> = a
        .networks()
        .await?
        .into_iter()
        .map(|mut n| {
            n.docker_networks = docker.remove(&n.name).unwrap_or_default();
            a.present(n)
        })
        .collect();
    Ok(ok(StatusCode::OK, nets))
}

async fn create_network(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: CreateNetwork = parse(&body)?;
    let net = a.create_network(req).await?;
    Ok(ok(StatusCode::CREATED, a.present(net)))
}

async fn get_network(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    let mut net = a.network(&name).await?;
    net.docker_networks = a
        .docker_networks_by_network()
        .await?
        .remove(&name)
        .unwrap_or_default();
    net.blocks = a.blocks(&name).await?;
    Ok(ok(StatusCode::OK, a.present(net)))
}

async fn list_services(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AgentError> {
    Ok(ok(
        StatusCode::OK,
        a.services(q.get("network").map(String::as_str)).await?,
    ))
}

async fn create_service(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: CreateService = parse(&body)?;
    Ok(ok(StatusCode::CREATED, a.create_service(req).await?))
}

async fn get_service(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.service(&name).await?))
}

async fn delete_service(
    State(a): Shared,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    a.delete_service(&name).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({ "removed": name })))
}

async fn list_policies(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AgentError> {
    Ok(ok(
        StatusCode::OK,
        a.policies(q.get("network").map(String::as_str)).await?,
    ))
}

async fn create_policy(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let policy: Policy = parse(&body)?;
    Ok(ok(StatusCode::CREATED, a.put_policy(policy, false).await?))
}

/// Creates or replaces (`berth policy apply`); the name in the path and the body agree.
async fn apply_policy(
    State(a): Shared,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, AgentError> {
    let policy: Policy = parse(&body)?;
    if policy.name != name {
        return Err(AgentError::Invalid(format!(
            "the policy in the body is named {:?}, not {name:?}",
            policy.name
        )));
    }
    Ok(ok(StatusCode::OK, a.put_policy(policy, true).await?))
}

/// Creates or replaces every policy of the body (an array) at once (`berth policy apply -f`).
async fn apply_policies(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let policies: Vec<Policy> = parse(&body)?;
    Ok(ok(StatusCode::OK, a.put_policies(policies, true).await?))
}

async fn get_policy(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.policy(&name).await?))
}

async fn delete_policy(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    a.delete_policy(&name).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({ "removed": name })))
}

/// `?src=..&dst=..[&port=80/tcp]`
async fn explain_policy(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AgentError> {
    let get = |k: &str| {
        q.get(k)
            .map(String::as_str)
            .ok_or_else(|| AgentError::Invalid(format!("the query needs {k}=")))
    };
    let explanation = a
        .explain_policy(get("src")?, get("dst")?, q.get("port").map(String::as_str))
        .await?;
    Ok(ok(StatusCode::OK, explanation))
}

async fn list_hosts(State(a): Shared) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.hosts().await?))
}

async fn remove_host(State(a): Shared, Path(id): Path<String>) -> Result<Response, AgentError> {
    let endpoints = a.remove_host(&id).await?;
    Ok(ok(
        StatusCode::OK,
        serde_json::json!({ "removed": id, "endpoints": endpoints }),
    ))
}

async fn delete_network(
    State(a): Shared,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    a.delete_network(&name).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({ "removed": name })))
}

async fn allocations(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.allocations(&name).await?))
}

async fn list_sandboxes(State(a): Shared) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.sandboxes().await?))
}

async fn create_sandbox(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: CreateSandbox = parse(&body)?;
    Ok(ok(StatusCode::CREATED, a.create_sandbox(&req.name).await?))
}

async fn get_sandbox(State(a): Shared, Path(name): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.sandbox(&name).await?))
}

async fn delete_sandbox(
    State(a): Shared,
    Path(name): Path<String>,
) -> Result<Response, AgentError> {
    a.delete_sandbox(&name).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({ "removed": name })))
}

async fn list_endpoints(
    State(a): Shared,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, AgentError> {
    Ok(ok(
        StatusCode::OK,
        a.endpoints(q.get("network").map(String::as_str)).await?,
    ))
}

async fn attach(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: Attach = parse(&body)?;
    Ok(ok(StatusCode::CREATED, a.attach(req).await?))
}

async fn get_endpoint(State(a): Shared, Path(id): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.endpoint(&id).await?))
}

async fn delete_endpoint(State(a): Shared, Path(id): Path<String>) -> Result<Response, AgentError> {
    a.delete_endpoint(&id).await?;
    Ok(ok(StatusCode::OK, serde_json::json!({ "removed": id })))
}

async fn detach(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: Detach = parse(&body)?;
    a.detach(&req).await?;
    Ok(ok(
        StatusCode::OK,
        serde_json::json!({ "detached": true, "network": req.network }),
    ))
}

async fn container_endpoint(
    State(a): Shared,
    Path((name, cid, ifname)): Path<(String, String, String)>,
) -> Result<Response, AgentError> {
    Ok(ok(
        StatusCode::OK,
        a.container_endpoint(&name, &cid, &ifname).await?,
    ))
}

async fn check(State(a): Shared, Path(id): Path<String>) -> Result<Response, AgentError> {
    Ok(ok(StatusCode::OK, a.check(&id).await?))
}

async fn gc(State(a): Shared, body: Bytes) -> Result<Response, AgentError> {
    let req: Gc = parse(&body)?;
    Ok(ok(StatusCode::OK, a.gc(&req).await?))
}
