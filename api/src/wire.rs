//! The API's request and response bodies (what the CLI sends and reads back), next to the
//! model types they carry.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{EndpointMode, HealthCheck, LbOptions, PortConfig, Service, Task};

/// `shoal run`: a standalone container on the node of the agent asked, on attachable
/// networks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerCreate {
    /// Its name (and DNS name); default: `ctr-` and six hex digits of its id.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub networks: Vec<NetworkAttach>,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

/// A standalone container and its task (None before it is placed or after it ended).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub container: Service,
    pub task: Option<Task>,
}

/// A CNI ADD, CHECK or DEL as the plugin forwards it to the agent of its node (the
/// plugin's configuration names the network; the runtime's environment gives the rest).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CniRequest {
    pub network: String,
    pub container_id: String,
    /// Empty for a DEL without a namespace (the spec allows it).
    #[serde(default)]
    pub netns: String,
    pub ifname: String,
    /// The container's name (`K8S_POD_NAME` in `CNI_ARGS`, which podman sets); None: `ctr-`
    /// and the first 12 characters of the container id.
    #[serde(default)]
    pub name: Option<String>,
    /// Its aliases on the network (the `aliases` capability of the runtime config).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// What ADD and CHECK answer: the attachment as Shoal made it (the plugin writes the CNI
/// result from it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CniAttached {
    /// The name the container has in DNS.
    pub name: String,
    pub ip: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mac: String,
    /// Nameserver and search list for the container's resolv.conf.
    pub nameserver: std::net::Ipv4Addr,
    pub search: Vec<String>,
}

/// A CNI GC (spec 1.1): the attachments of `network` the runtime still has; the node's
/// other CNI attachments on that network are removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CniGc {
    pub network: String,
    /// (container id, interface name)
    pub valid: Vec<(String, String)>,
}

/// A request to create a network (what the CLI sends).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub internal: bool,
    /// Driver options (`--opt KEY[=VALUE]`): see `model::NetworkOptions`.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// `--network NET[,alias=A]...`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkAttach {
    pub network: String,
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreate {
    pub name: String,
    #[serde(default)]
    pub networks: Vec<NetworkAttach>,
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// The image tasks run (containers through podman); None: process tasks.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub lb: LbOptions,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceUpdate {
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub publish_add: Vec<PortConfig>,
    /// Published ports to remove (any protocol), or `PORT/PROTO`.
    #[serde(default)]
    pub publish_rm: Vec<String>,
}

/// A service with its running count, as `service ls` shows it.
#[derive(Serialize, Deserialize)]
pub struct ServiceStatus {
    #[serde(flatten)]
    pub service: Service,
    pub running: usize,
}

impl ServiceStatus {
    pub fn new(service: Service, tasks: &[Task]) -> Self {
        let running = tasks
            .iter()
            .filter(|t| t.service_id == service.id && t.is_serving())
            .count();
        ServiceStatus { service, running }
    }
}

/// A task and where its sandbox lives on this node (for `lab exec`).
#[derive(Serialize, Deserialize)]
pub struct TaskLocation {
    pub task: Task,
    pub local: bool,
    /// The task's network namespace (Shoal's, whatever the runtime).
    pub netns: String,
    /// How to run a command inside the task (`lab exec`).
    pub entry: SandboxEntry,
}

/// How to enter a task's sandbox: what the API hands `lab exec`, and what health checks
/// run in. A runtime with containers of its own (podman) adds its own way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SandboxEntry {
    /// The process runtime's sandbox: the task's network namespace (a path), its
    /// resolv.conf bound over /etc/resolv.conf in a mount namespace of its own, and its
    /// hostname in a UTS namespace of its own.
    Process {
        netns: PathBuf,
        resolv_conf: PathBuf,
        hostname: String,
    },
    /// A container of an image task: commands run through `ENGINE exec CONTAINER`.
    Container {
        /// The container engine (podman).
        engine: PathBuf,
        container: String,
    },
}
