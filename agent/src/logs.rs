//! Task logs from whichever node runs each task. The CLI asks its agent
//! (`GET /v1/services/{name}/logs`, `GET /v1/tasks/{what}/logs`); that agent reads its own
//! tasks' output through the runtime (`podman logs`, or `tail` of a process task's output
//! file) and asks the other nodes' agents over their peer API (`GET
//! /v1/peer/tasks/{id}/logs` on TCP `addr:peer_port`, with the cluster's peer token), then
//! streams every line with Docker's prefix `web.1@node2 | `.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use futures::stream::{self, BoxStream, StreamExt as _};
use http_body_util::BodyExt as _;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};

use shoal_api::model::Task;
use shoal_control::state::ClusterState;

use crate::server::{ApiError, ApiState};

/// The header carrying the peer token.
pub const PEER_HEADER: &str = "x-shoal-peer-token";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// The last N lines of each task (all when absent).
    #[serde(default)]
    pub tail: Option<u32>,
    /// Keep streaming new lines.
    #[serde(default)]
    pub follow: bool,
    /// Lines start with `task@node | ` (`service logs`); `shoal logs` of one container,
    /// like `docker logs`, prints them bare.
    #[serde(default = "yes")]
    pub prefix: bool,
}

fn yes() -> bool {
    true
}

impl LogQuery {
    fn to_query(&self) -> String {
        let mut q = format!("follow={}", self.follow);
        if let Some(n) = self.tail {
            q += &format!("&tail={n}");
        }
        q
    }
}

type Lines = BoxStream<'static, String>;

fn lines_of<R: AsyncRead + Send + Unpin + 'static>(r: R) -> Lines {
    stream::unfold(BufReader::new(r).lines(), |mut l| async move {
        l.next_line().await.ok().flatten().map(|x| (x, l))
    })
    .boxed()
}

/// Lines a command prints on stdout and stderr; the command is killed when the stream is
/// dropped (the client went away).
fn command_lines(cmd: std::process::Command) -> anyhow::Result<Lines> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("running the log command")?;
    let out = child.stdout.take().context("no stdout")?;
    let err = child.stderr.take().context("no stderr")?;
    // The child lives as long as its stdout stream.
    let out = stream::unfold((lines_of(out), child), |(mut l, c)| async move {
        l.next().await.map(|x| (x, (l, c)))
    })
    .boxed();
    Ok(stream::select(out, lines_of(err)).boxed())
}

/// A task on another node, through that node's peer API.
async fn peer_lines(
    addr: SocketAddr,
    token: &str,
    task_id: &str,
    q: &LogQuery,
) -> anyhow::Result<Lines> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the agent at {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/v1/peer/tasks/{task_id}/logs?{}", q.to_query()))
        .header("host", "shoal")
        .header(PEER_HEADER, token)
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    let data = resp
        .into_body()
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    Ok(lines_of(tokio_util::io::StreamReader::new(data)))
}

/// The lines of one task, local or remote, each with its prefix; a failure is one line.
async fn task_lines(s: &ApiState, st: &ClusterState, t: &Task, q: &LogQuery) -> Option<Lines> {
    let node = st.nodes.get(&t.node_id).map(|(n, _)| n);
    let prefix = if q.prefix {
        format!(
            "{}@{} | ",
            t.name(),
            node.map_or(t.node_id.as_str(), |n| n.name.as_str())
        )
    } else {
        String::new()
    };
    let lines = if t.node_id == s.node_id {
        let cmd = s.runtime.logs(&t.id, q.tail, q.follow)?;
        command_lines(cmd)
    } else {
        match (node.and_then(|n| n.addr.zip(n.peer_port)), &s.peer_token) {
            (Some((ip, port)), Some(token)) => {
                peer_lines(SocketAddr::from((ip, port)), token, &t.id, q).await
            }
            (None, _) => Err(anyhow::anyhow!("its node has no peer API address")),
            (_, None) => Err(anyhow::anyhow!("this agent has no peer token")),
        }
    };
    Some(match lines {
        Ok(l) => l.map(move |x| format!("{prefix}{x}")).boxed(),
        Err(e) => {
            stream::once(async move { format!("{prefix}shoal: logs unavailable: {e:#}") }).boxed()
        }
    })
}

async fn respond(s: &ApiState, tasks: Vec<Task>, q: &LogQuery) -> Response {
    let st: Arc<ClusterState> = s.state.borrow().clone();
    let mut streams = vec![];
    for t in &tasks {
        if let Some(l) = task_lines(s, &st, t, q).await {
            streams.push(l);
        }
    }
    // Following: lines as they come from every task; otherwise task after task.
    let all: Lines = if q.follow {
        stream::select_all(streams).boxed()
    } else {
        stream::iter(streams).flatten().boxed()
    };
    Response::new(Body::from_stream(
        all.map(|l| Ok::<_, Infallible>(Bytes::from(l + "\n"))),
    ))
}

/// `GET /v1/services/{name}/logs?tail=N&follow=true`
pub async fn service_logs(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let mut tasks = s.cluster.service_tasks(&name).await?;
    tasks.sort_by_key(|t| t.slot);
    Ok(respond(&s, tasks, &q).await)
}

/// `GET /v1/tasks/{what}/logs?tail=N&follow=true`
pub async fn task_logs(
    State(s): State<ApiState>,
    UrlPath(what): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let t = s.cluster.find_task(&what).await?;
    Ok(respond(&s, vec![t], &q).await)
}

/// What the peer API needs.
#[derive(Clone)]
pub struct PeerState {
    pub node_id: String,
    pub token: String,
    pub runtime: Arc<dyn shoal_node::runtime::Runtime>,
    pub state: tokio::sync::watch::Receiver<Arc<ClusterState>>,
}

/// `GET /v1/peer/tasks/{id}/logs`: a local task's raw lines, for another agent.
async fn peer_task_logs(
    State(p): State<PeerState>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    if headers.get(PEER_HEADER).map(|v| v.as_bytes()) != Some(p.token.as_bytes()) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "bad or missing peer token".into(),
        ));
    }
    let local = p
        .state
        .borrow()
        .tasks
        .get(&id)
        .is_some_and(|(t, _)| t.node_id == p.node_id);
    let cmd = local
        .then(|| p.runtime.logs(&id, q.tail, q.follow))
        .flatten()
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no output of task {id} on this node"),
            )
        })?;
    let lines = command_lines(cmd)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    Ok(Response::new(Body::from_stream(
        lines.map(|l| Ok::<_, Infallible>(Bytes::from(l + "\n"))),
    )))
}

/// Serves the peer API on `addr` (TCP) in the background.
pub async fn serve_peer(
    addr: SocketAddr,
    p: PeerState,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = axum::Router::new()
        .route("/v1/peer/tasks/{id}/logs", get(peer_task_logs))
        .with_state(p);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the peer API on {addr}"))?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "peer API stopped");
        }
    }))
}
