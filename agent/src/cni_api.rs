//! The API routes the CNI plugin calls (`/v1/cni/...`): ADD makes a standalone container
//! whose sandbox is the runtime's namespace and answers once the node has plumbed its
//! interface and serves its DNS; CHECK looks at the record and the kernel; DEL and GC
//! remove. The plugin turns these answers into CNI results and error codes (cni/).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use serde_json::json;

use shoal_api::model::{Service, Task, TaskState};
use shoal_api::wire::{CniAttached, CniGc, CniRequest};
use shoal_control::state::ClusterState;

use crate::server::{ApiError, ApiResult, ApiState, body};

/// The longest an ADD waits for the node to plumb the container (a pass or two).
const ADD_WAIT: Duration = Duration::from_secs(30);
/// What a container's resolv.conf names.
const NAMESERVER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 11);

fn task_of<'a>(st: &'a ClusterState, svc: &Service) -> Option<&'a Task> {
    st.task_list().find(|t| t.service_id == svc.id)
}

fn attached(s: &ApiState, st: &ClusterState, svc: &Service, t: &Task) -> Option<CniAttached> {
    let tn = t.networks.first()?;
    let net = st.network_by_id(&tn.network_id)?;
    Some(CniAttached {
        name: svc.name.clone(),
        ip: tn.ip,
        prefix_len: net.subnet.prefix_len(),
        gateway: net.gateway,
        mac: tn.mac.clone(),
        nameserver: NAMESERVER,
        search: s.search.clone(),
    })
}

/// Waits until the container's task runs on this node (its interface and DNS are in
/// place); an error when it failed or the wait ran out.
async fn wait_running(s: &ApiState, svc: &Service) -> Result<CniAttached, ApiError> {
    let mut rx = s.state.clone();
    let wait = async {
        loop {
            let st: Arc<ClusterState> = rx.borrow_and_update().clone();
            if let Some(t) = task_of(&st, svc) {
                match t.state {
                    TaskState::Running => {
                        if let Some(a) = attached(s, &st, svc, t) {
                            return Ok(a);
                        }
                    }
                    TaskState::Failed | TaskState::Shutdown => {
                        return Err(ApiError(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!(
                                "attaching {}: {}",
                                svc.name,
                                t.error.as_deref().unwrap_or("the task ended")
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the agent is shutting down".into(),
                ));
            }
        }
    };
    match tokio::time::timeout(ADD_WAIT, wait).await {
        Ok(r) => r,
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the node did not attach {} within {}s (see the agent's log)",
                svc.name,
                ADD_WAIT.as_secs()
            ),
        )),
    }
}

/// `POST /v1/cni/add`. Idempotent; on failure the record made by this call is removed
/// again (no name, address or task is left behind).
pub async fn add(
    State(s): State<ApiState>,
    b: Result<Json<CniRequest>, JsonRejection>,
) -> ApiResult<CniAttached> {
    let (svc, created) = s.cluster.attach_cni(body(b)?, &s.node_id).await?;
    match wait_running(&s, &svc).await {
        Ok(a) => Ok(Json(a)),
        Err(e) => {
            if created && let Err(rm) = s.cluster.remove_container(&svc.name).await {
                tracing::warn!(container = %svc.name, error = %rm, "removing a failed CNI attachment");
            }
            Err(e)
        }
    }
}

/// `POST /v1/cni/check`: 404 for an unknown attachment, 409 when it is not what the
/// runtime says or the kernel lacks it.
pub async fn check(
    State(s): State<ApiState>,
    b: Result<Json<CniRequest>, JsonRejection>,
) -> ApiResult<CniAttached> {
    let req = body(b)?;
    let Some(svc) = s
        .cluster
        .cni_container(&req.container_id, &req.ifname)
        .await?
    else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "container {} ({}) is not attached to Shoal",
                req.container_id, req.ifname
            ),
        ));
    };
    let conflict = |m: String| ApiError(StatusCode::CONFLICT, m);
    let cni = svc.standalone.as_ref().and_then(|sa| sa.cni.as_ref());
    if cni.is_some_and(|c| !req.netns.is_empty() && c.netns != req.netns) {
        return Err(conflict(format!(
            "{} is attached in another namespace than {}",
            svc.name, req.netns
        )));
    }
    if svc
        .networks
        .first()
        .is_none_or(|n| n.network != req.network)
    {
        return Err(conflict(format!(
            "{} is not attached to network {:?}",
            svc.name, req.network
        )));
    }
    let st = s.state.borrow().clone();
    let t = task_of(&st, &svc)
        .filter(|t| t.state == TaskState::Running && t.node_id == s.node_id)
        .ok_or_else(|| conflict(format!("{} is not running on this node", svc.name)))?;
    let a = attached(&s, &st, &svc, t)
        .ok_or_else(|| conflict(format!("{} has no address", svc.name)))?;
    let netns = cni.map(|c| c.netns.clone()).unwrap_or_default();
    let (ifname, ip) = (req.ifname.clone(), a.ip);
    tokio::task::spawn_blocking(move || shoal_node::cni::check_interface(&netns, &ifname, ip))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| conflict(format!("{e:#}")))?;
    Ok(Json(a))
}

/// `POST /v1/cni/del`: removes the attachment; nothing to do for an unknown one.
pub async fn del(
    State(s): State<ApiState>,
    b: Result<Json<CniRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let req = body(b)?;
    match s
        .cluster
        .cni_container(&req.container_id, &req.ifname)
        .await?
    {
        Some(svc) => {
            s.cluster.remove_container(&svc.name).await?;
            Ok(Json(json!({ "removed": svc.name })))
        }
        None => Ok(Json(json!({}))),
    }
}

/// `POST /v1/cni/gc`: this node's attachments on the network that the runtime no longer
/// lists are removed; answers their names.
pub async fn gc(
    State(s): State<ApiState>,
    b: Result<Json<CniGc>, JsonRejection>,
) -> ApiResult<Vec<String>> {
    let req = body(b)?;
    let mut removed = vec![];
    for svc in s.cluster.containers().await? {
        let Some(sa) = &svc.standalone else { continue };
        let Some(c) = &sa.cni else { continue };
        let valid = req
            .valid
            .iter()
            .any(|(id, ifname)| *id == c.container_id && *ifname == c.ifname);
        if sa.node_id == s.node_id
            && svc
                .networks
                .first()
                .is_some_and(|n| n.network == req.network)
            && !valid
        {
            s.cluster.remove_container(&svc.name).await?;
            removed.push(svc.name.clone());
        }
    }
    Ok(Json(removed))
}
