//! The CLI's client for the agent API (HTTP/1.1 over a unix socket).

use std::path::{Path, PathBuf};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{Network, Node, Service, Task};
use crate::wire::{CniAttached, CniGc, CniRequest};
use crate::wire::{ContainerCreate, ContainerStatus, ServiceStatus, TaskLocation};
use crate::wire::{NetworkCreate, ServiceCreate, ServiceUpdate};

pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";

/// The agent's error answer: its `{"error": ...}` message, else the body as text.
fn api_error(status: u16, bytes: &[u8]) -> anyhow::Error {
    let message = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).to_string());
    ClientError::Api { status, message }.into()
}

fn log_query(tail: Option<u32>, follow: bool) -> String {
    match tail {
        Some(n) => format!("follow={follow}&tail={n}"),
        None => format!("follow={follow}"),
    }
}

/// Where the agent is: `-H/--host` or `SHOAL_HOST`, as `unix:///path` or a plain path.
pub fn socket_path(host: Option<&str>) -> PathBuf {
    match host {
        Some(h) => PathBuf::from(h.strip_prefix("unix://").unwrap_or(h)),
        None => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// The failures a caller may act on (inside the `anyhow::Error` the calls return:
/// `downcast_ref::<ClientError>()`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answers on the socket.
    #[error(
        "cannot reach the shoal agent at {} ({source}): is the agent running? (set -H/--host or SHOAL_HOST)",
        socket.display()
    )]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error status and its message.
    #[error("{message}")]
    Api { status: u16, message: String },
}

impl ClientError {
    /// True when `e` is the agent's 404 (no such object).
    pub fn is_not_found(e: &anyhow::Error) -> bool {
        matches!(
            e.downcast_ref::<ClientError>(),
            Some(ClientError::Api { status: 404, .. })
        )
    }

    /// True when `e` says no agent answers.
    pub fn is_unreachable(e: &anyhow::Error) -> bool {
        matches!(
            e.downcast_ref::<ClientError>(),
            Some(ClientError::Unreachable { .. })
        )
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request; the answer's head, its body still to read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the agent")?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "shoal")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        sender
            .send_request(req)
            .await
            .context("talking to the agent")
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the agent's answer")?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<T> {
        let (status, bytes) = self.call(method, path, body).await?;
        if !(200..300).contains(&status) {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "unexpected answer from the agent: {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(Method::GET, path, None).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.json(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(Method::DELETE, path, None).await
    }

    // The API, one method per route (agent/src/server.rs serves them): the only place its paths are
    // written on the client side.

    /// `GET /v1/info`: the agent's version and cluster summary.
    pub async fn info(&self) -> anyhow::Result<serde_json::Value> {
        self.get("/v1/info").await
    }

    pub async fn networks(&self) -> anyhow::Result<Vec<Network>> {
        self.get("/v1/networks").await
    }

    pub async fn network(&self, name: &str) -> anyhow::Result<Network> {
        self.get(&format!("/v1/networks/{}", seg(name))).await
    }

    pub async fn network_create(&self, req: &NetworkCreate) -> anyhow::Result<Network> {
        self.post("/v1/networks", req).await
    }

    pub async fn network_rm(&self, name: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self.delete(&format!("/v1/networks/{}", seg(name))).await?;
        Ok(())
    }

    pub async fn services(&self) -> anyhow::Result<Vec<ServiceStatus>> {
        self.get("/v1/services").await
    }

    pub async fn service(&self, name: &str) -> anyhow::Result<ServiceStatus> {
        self.get(&format!("/v1/services/{}", seg(name))).await
    }

    pub async fn service_create(&self, req: &ServiceCreate) -> anyhow::Result<Service> {
        self.post("/v1/services", req).await
    }

    pub async fn service_update(&self, name: &str, req: &ServiceUpdate) -> anyhow::Result<Service> {
        self.post(&format!("/v1/services/{}/update", seg(name)), req)
            .await
    }

    pub async fn service_rm(&self, name: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self.delete(&format!("/v1/services/{}", seg(name))).await?;
        Ok(())
    }

    /// `shoal run`: a standalone container on the node of the agent asked.
    pub async fn container_create(&self, req: &ContainerCreate) -> anyhow::Result<Service> {
        self.post("/v1/containers", req).await
    }

    pub async fn containers(&self) -> anyhow::Result<Vec<ContainerStatus>> {
        self.get("/v1/containers").await
    }

    pub async fn container_rm(&self, name: &str) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .delete(&format!("/v1/containers/{}", seg(name)))
            .await?;
        Ok(())
    }

    /// `POST /v1/cni/add`: attaches a container (idempotent), answered once it is plumbed
    /// and in DNS.
    pub async fn cni_add(&self, req: &CniRequest) -> anyhow::Result<CniAttached> {
        self.post("/v1/cni/add", req).await
    }

    /// `POST /v1/cni/check`: the attachment exists and the kernel has it (404: unknown).
    pub async fn cni_check(&self, req: &CniRequest) -> anyhow::Result<CniAttached> {
        self.post("/v1/cni/check", req).await
    }

    /// `POST /v1/cni/del`: detaches (nothing to do for an unknown container).
    pub async fn cni_del(&self, req: &CniRequest) -> anyhow::Result<()> {
        let _: serde_json::Value = self.post("/v1/cni/del", req).await?;
        Ok(())
    }

    /// `POST /v1/cni/gc`: removes this node's attachments on the network that are not
    /// listed; answers the names removed.
    pub async fn cni_gc(&self, req: &CniGc) -> anyhow::Result<Vec<String>> {
        self.post("/v1/cni/gc", req).await
    }

    /// `GET /v1/services/{name}/logs`: every task's output, prefixed `web.1@node2 | `,
    /// copied to `out` as it arrives (until the agent ends it, or forever with `follow`).
    pub async fn service_logs(
        &self,
        name: &str,
        tail: Option<u32>,
        follow: bool,
        out: &mut (dyn std::io::Write + Send),
    ) -> anyhow::Result<()> {
        let path = format!(
            "/v1/services/{}/logs?{}",
            seg(name),
            log_query(tail, follow)
        );
        self.stream(&path, out).await
    }

    /// `GET /v1/tasks/{what}/logs`: one task's output, lines bare (a container is `NAME.1`).
    pub async fn task_logs(
        &self,
        what: &str,
        tail: Option<u32>,
        follow: bool,
        out: &mut (dyn std::io::Write + Send),
    ) -> anyhow::Result<()> {
        let path = format!(
            "/v1/tasks/{}/logs?{}&prefix=false",
            seg(what),
            log_query(tail, follow)
        );
        self.stream(&path, out).await
    }

    /// A GET whose body is copied to `out` frame by frame.
    async fn stream(
        &self,
        path: &str,
        out: &mut (dyn std::io::Write + Send),
    ) -> anyhow::Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if !(200..300).contains(&status) {
            let bytes = body
                .collect()
                .await
                .context("reading the agent's answer")?
                .to_bytes();
            return Err(api_error(status, &bytes));
        }
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.context("reading the agent's answer")?.into_data() {
                out.write_all(&data)?;
                out.flush()?;
            }
        }
        Ok(())
    }

    pub async fn service_tasks(&self, name: &str) -> anyhow::Result<Vec<Task>> {
        self.get(&format!("/v1/services/{}/tasks", seg(name))).await
    }

    /// A task by id, id prefix or name (`web.1`), with how to enter it.
    pub async fn task(&self, what: &str) -> anyhow::Result<TaskLocation> {
        self.get(&format!("/v1/tasks/{}", seg(what))).await
    }

    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        self.get("/v1/nodes").await
    }

    /// `GET /v1/node`: this agent's node and its last reconcile report.
    pub async fn node(&self) -> anyhow::Result<serde_json::Value> {
        self.get("/v1/node").await
    }

    /// `POST /v1/node/rotate-key`: a new WireGuard key pair for this agent's node.
    pub async fn rotate_key(&self) -> anyhow::Result<serde_json::Value> {
        self.post("/v1/node/rotate-key", &serde_json::json!({}))
            .await
    }
}

/// Percent-encodes a path segment (names are validated, but be safe for any input).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prints rows with columns padded to the widest cell.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}
