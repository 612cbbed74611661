//! The agent's HTTP/JSON API on a unix socket (mode 0600). All validation happens here and
//! in [`shoal_control::cluster`]; a refused request changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::task::JoinHandle;

use shoal_api::wire::{
    ContainerCreate, ContainerStatus, NetworkCreate, ServiceCreate, ServiceStatus, ServiceUpdate,
    TaskLocation,
};
use shoal_control::cluster::{Cluster, ClusterError};
use shoal_control::store::StoreError;
use shoal_node::report::NodeReport;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Clone)]
pub struct ApiState {
    pub cluster: Cluster,
    pub node_id: String,
    pub node_name: String,
    pub report: Arc<Mutex<NodeReport>>,
    /// The node's runtime: how to enter a local task's sandbox.
    pub runtime: Arc<dyn shoal_node::runtime::Runtime>,
    /// The agent's view of the cluster, for lookups that must work while the store is away.
    pub state: tokio::sync::watch::Receiver<Arc<shoal_control::state::ClusterState>>,
    /// The search list of containers' resolv.conf (the CNI result carries it).
    pub search: Vec<String>,
    /// The cluster's peer API token (other nodes' task logs); None: not available.
    pub peer_token: Option<String>,
    /// Asks the agent loop for a new WireGuard key pair; the answer is the new public key.
    pub rotate: tokio::sync::mpsc::UnboundedSender<RotateRequest>,
}

/// `POST /v1/node/rotate-key`, handed to the agent loop (which owns the key).
pub type RotateRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let code = match &e {
            ClusterError::Invalid(_) => StatusCode::BAD_REQUEST,
            ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
            ClusterError::Conflict(_) => StatusCode::CONFLICT,
            ClusterError::Store(StoreError::Unavailable { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match &r {
            JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(code, format!("invalid request body: {}", r.body_text()))
    }
}

pub type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(ApiError::from)
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/networks", get(networks).post(network_create))
        .route("/v1/networks/{name}", get(network_get).delete(network_rm))
        .route("/v1/services", get(services).post(service_create))
        .route("/v1/services/{name}", get(service_get).delete(service_rm))
        .route("/v1/services/{name}/update", post(service_update))
        .route("/v1/services/{name}/tasks", get(service_tasks))
        .route("/v1/services/{name}/logs", get(crate::logs::service_logs))
        .route("/v1/tasks/{what}/logs", get(crate::logs::task_logs))
        .route("/v1/containers", get(containers).post(container_create))
        .route("/v1/containers/{name}", delete(container_rm))
        .route("/v1/cni/add", post(crate::cni_api::add))
        .route("/v1/cni/check", post(crate::cni_api::check))
        .route("/v1/cni/del", post(crate::cni_api::del))
        .route("/v1/cni/gc", post(crate::cni_api::gc))
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{what}", get(task_get))
        .route("/v1/nodes", get(nodes))
        .route("/v1/node", get(node_inspect))
        .route("/v1/node/rotate-key", post(rotate_key))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Binds the socket (refusing to steal one a live agent serves) and serves in the background.
pub async fn serve(path: &Path, state: ApiState) -> anyhow::Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("another agent is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server stopped");
        }
    }))
}

async fn info(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(
        json!({ "node_id": s.node_id, "node_name": s.node_name, "version": env!("CARGO_PKG_VERSION") }),
    )
}

async fn networks(State(s): State<ApiState>) -> ApiResult<Vec<shoal_api::model::Network>> {
    Ok(Json(s.cluster.networks().await?))
}

async fn network_create(
    State(s): State<ApiState>,
    b: Result<Json<NetworkCreate>, JsonRejection>,
) -> ApiResult<shoal_api::model::Network> {
    Ok(Json(s.cluster.create_network(body(b)?).await?))
}

async fn network_get(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<shoal_api::model::Network> {
    Ok(Json(s.cluster.network(&name).await?))
}

async fn network_rm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    s.cluster.remove_network(&name).await?;
    Ok(Json(json!({ "removed": name })))
}

async fn services(State(s): State<ApiState>) -> ApiResult<Vec<ServiceStatus>> {
    let tasks = s.cluster.tasks().await?;
    let out = s
        .cluster
        .services()
        .await?
        .into_iter()
        .filter(|svc| svc.standalone.is_none())
        .map(|svc| ServiceStatus::new(svc, &tasks))
        .collect();
    Ok(Json(out))
}

/// `shoal run`: on this agent's node.
async fn container_create(
    State(s): State<ApiState>,
    b: Result<Json<ContainerCreate>, JsonRejection>,
) -> ApiResult<shoal_api::model::Service> {
    Ok(Json(
        s.cluster.create_container(body(b)?, &s.node_id).await?,
    ))
}

async fn containers(State(s): State<ApiState>) -> ApiResult<Vec<ContainerStatus>> {
    let tasks = s.cluster.tasks().await?;
    let out = s
        .cluster
        .containers()
        .await?
        .into_iter()
        .map(|c| {
            let task = tasks.iter().find(|t| t.service_id == c.id).cloned();
            ContainerStatus { container: c, task }
        })
        .collect();
    Ok(Json(out))
}

async fn container_rm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    s.cluster.remove_container(&name).await?;
    Ok(Json(json!({ "removed": name })))
}

async fn service_create(
    State(s): State<ApiState>,
    b: Result<Json<ServiceCreate>, JsonRejection>,
) -> ApiResult<shoal_api::model::Service> {
    Ok(Json(s.cluster.create_service(body(b)?).await?))
}

async fn service_get(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<ServiceStatus> {
    let svc = s.cluster.service(&name).await?;
    let tasks = s.cluster.tasks().await?;
    Ok(Json(ServiceStatus::new(svc, &tasks)))
}

async fn service_update(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    b: Result<Json<ServiceUpdate>, JsonRejection>,
) -> ApiResult<shoal_api::model::Service> {
    Ok(Json(s.cluster.update_service(&name, body(b)?).await?))
}

async fn service_rm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    s.cluster.remove_service(&name).await?;
    Ok(Json(json!({ "removed": name })))
}

async fn service_tasks(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Vec<shoal_api::model::Task>> {
    Ok(Json(s.cluster.service_tasks(&name).await?))
}

async fn tasks(State(s): State<ApiState>) -> ApiResult<Vec<shoal_api::model::Task>> {
    Ok(Json(s.cluster.tasks().await?))
}

async fn task_get(
    State(s): State<ApiState>,
    UrlPath(what): UrlPath<String>,
) -> ApiResult<TaskLocation> {
    // `lab exec` must work during a store outage: fall back to the agent's last view.
    let task = match s.cluster.find_task(&what).await {
        Err(ClusterError::Store(StoreError::Unavailable { .. })) => {
            let st = s.state.borrow().clone();
            shoal_control::cluster::pick_task(st.task_list(), &what)?
        }
        r => r?,
    };
    Ok(Json(TaskLocation {
        local: task.node_id == s.node_id,
        netns: s.runtime.netns(&task.id),
        entry: s.runtime.entry(&task.id, &task.hostname()),
        task,
    }))
}

async fn nodes(State(s): State<ApiState>) -> ApiResult<Vec<shoal_api::model::Node>> {
    Ok(Json(s.cluster.nodes().await?))
}

/// A new WireGuard key pair for this node: the answer carries the new public key.
async fn rotate_key(State(s): State<ApiState>) -> ApiResult<serde_json::Value> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let gone = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        )
    };
    s.rotate.send(tx).map_err(|_| gone())?;
    match rx.await.map_err(|_| gone())? {
        Ok(public_key) => Ok(Json(json!({ "public_key": public_key }))),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, e)),
    }
}

async fn node_inspect(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let r = s.report.lock().expect("lock").clone();
    Json(json!({ "node_id": s.node_id, "node_name": s.node_name, "report": r }))
}
