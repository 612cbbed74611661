//! The docker-like command line. Every command but `agent`, `whoami`, `lab` and `version`
//! is a client of the local agent's API.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use shoal::config::StoreKind;
use shoal_api::client::{Client, socket_path, table};
use shoal_api::model::{
    EndpointMode, HealthCheck, LbOptions, Network, Node, PortConfig, Service, Task, TaskState,
    parse_duration_ms,
};
use shoal_api::wire::{
    ContainerCreate, ContainerStatus, NetworkAttach, NetworkCreate, ServiceCreate, ServiceStatus,
    ServiceUpdate,
};

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Service discovery and load balancing for containers: embedded DNS, VIPs, overlay networks"
)]
pub struct Cli {
    /// The agent's API socket (unix:///path or a path)
    #[arg(short = 'H', long = "host", env = "SHOAL_HOST", global = true)]
    pub host: Option<String>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Manage overlay networks
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Show nodes
    #[command(subcommand)]
    Node(NodeCmd),
    /// Run a standalone container on this node, on attachable networks (docker run)
    Run(Box<RunArgs>),
    /// List standalone containers
    Ps(FormatArg),
    /// Remove standalone containers
    Rm {
        /// Container names
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show a standalone container's or a task's output, from whichever node runs it
    Logs {
        #[command(flatten)]
        opts: LogOpts,
        /// A container name or a task (web.1, a task id)
        name: String,
    },
    /// Run the node agent
    Agent(Box<AgentArgs>),
    /// Built-in HTTP/UDP echo server reporting who answered and whom it saw
    Whoami {
        /// TCP port of the HTTP server
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// UDP port of the echo (default: the TCP port)
        #[arg(long)]
        udp_port: Option<u16>,
    },
    /// A whole cluster on this machine, from network namespaces
    #[command(subcommand)]
    Lab(LabCmd),
    /// Print the version
    Version,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `shoal completion bash > /etc/bash_completion.d/shoal`
    Completion {
        /// Shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `shoal agent`: every setting comes from, in this order of precedence, a flag, its
/// `SHOAL_*` environment variable, the config file, the built-in default
/// (see `config/agent.toml` in the repository for every key and its default).
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Configuration file (TOML; unknown keys are refused)
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text, or json (one object per line, with span fields)
    #[arg(long, value_enum, env = "SHOAL_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// This node's name in `node ls` [config: node_name; default: the host name]
    #[arg(long, env = "SHOAL_NODE_NAME")]
    pub node_name: Option<String>,
    /// Unix socket of the API, created mode 0600 [config: socket; default: /run/shoal/shoal.sock]
    #[arg(long, env = "SHOAL_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Directory of the node id, task files and the embedded store [config: state_dir; default: /var/lib/shoal]
    #[arg(long, env = "SHOAL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Prefix of every namespace the agent creates [config: netns_prefix; default: shoal-]
    #[arg(long, env = "SHOAL_NETNS_PREFIX")]
    pub netns_prefix: Option<String>,
    /// Underlay IPv4 address of this node (VXLAN endpoint) [config: advertise_addr; default: detected]
    #[arg(long, env = "SHOAL_ADVERTISE_ADDR")]
    pub advertise_addr: Option<std::net::Ipv4Addr>,
    /// Underlay interface [config: underlay_dev; default: the one holding advertise_addr]
    #[arg(long, env = "SHOAL_UNDERLAY_DEV")]
    pub underlay_dev: Option<String>,
    /// Cluster store: embedded (one node) or etcd [config: store.kind; default: embedded]
    #[arg(long, value_enum, env = "SHOAL_STORE")]
    pub store: Option<StoreArg>,
    /// etcd endpoints, comma-separated host:port or http[s]://host:port [config: store.endpoints]
    #[arg(long, env = "SHOAL_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// CA certificate (PEM) of etcd's server certificate [config: store.tls.ca]
    #[arg(long, env = "SHOAL_ETCD_CA", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd [config: store.tls.cert]
    #[arg(long, env = "SHOAL_ETCD_CERT", requires_all = ["etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of the etcd client certificate [config: store.tls.key]
    #[arg(long, env = "SHOAL_ETCD_KEY", requires_all = ["etcd_ca", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
    /// Liveness lease TTL in seconds: how long after its agent stops a node is declared down
    /// [config: lease_ttl_secs; default: 3]
    #[arg(long, env = "SHOAL_LEASE_TTL_SECS")]
    pub lease_ttl_secs: Option<u64>,
    /// Seconds between full reconcile passes: the longest a deleted kernel object of
    /// Shoal's stays gone [config: resync_secs; default: 10]
    #[arg(long, env = "SHOAL_RESYNC_SECS")]
    pub resync_secs: Option<u64>,
    /// Prometheus /metrics address ip:port, "" to turn it off
    /// [config: metrics_addr; default: 127.0.0.1:9469]
    #[arg(long, env = "SHOAL_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// VIP dataplane: nftables or ipvs [config: lb.dataplane; default: nftables]
    #[arg(long, value_enum, env = "SHOAL_LB_DATAPLANE")]
    pub lb_dataplane: Option<DataplaneArg>,
    /// Print the effective configuration (file, environment and flags together) as TOML
    /// and exit, without starting
    #[arg(long)]
    pub print_config: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataplaneArg {
    Nftables,
    Ipvs,
}

impl AgentArgs {
    /// The configuration this agent runs with: file (or defaults), then environment and
    /// flags on top, then validated as a whole.
    pub fn resolve(&self) -> anyhow::Result<shoal::config::AgentConfig> {
        use shoal::config::{AgentConfig, Dataplane, EtcdTls};
        let mut c = match &self.config {
            Some(p) => AgentConfig::load_unvalidated(p)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = &self.node_name {
            c.node_name = v.clone();
        }
        if let Some(v) = &self.socket {
            c.socket = v.clone();
        }
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = &self.netns_prefix {
            c.netns_prefix = v.clone();
        }
        if let Some(v) = self.advertise_addr {
            c.advertise_addr = Some(v);
        }
        if let Some(v) = &self.underlay_dev {
            c.underlay_dev = Some(v.clone());
        }
        if let Some(v) = self.store {
            c.store.kind = match v {
                StoreArg::Embedded => StoreKind::Embedded,
                StoreArg::Etcd => StoreKind::Etcd,
            };
        }
        if let Some(v) = &self.etcd_endpoints {
            c.store.endpoints = v.clone();
        }
        if let (Some(ca), Some(cert), Some(key)) = (&self.etcd_ca, &self.etcd_cert, &self.etcd_key)
        {
            c.store.tls = Some(EtcdTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: c.store.tls.as_ref().and_then(|t| t.server_name.clone()),
            });
        }
        if let Some(v) = self.lease_ttl_secs {
            c.lease_ttl_secs = v;
        }
        if let Some(v) = self.resync_secs {
            c.resync_secs = v;
        }
        if let Some(v) = &self.metrics_addr {
            c.metrics_addr = v.clone();
        }
        if let Some(v) = self.lb_dataplane {
            c.lb.dataplane = match v {
                DataplaneArg::Nftables => Dataplane::Nftables,
                DataplaneArg::Ipvs => Dataplane::Ipvs,
            };
        }
        c.validate().context(
            "invalid agent configuration (file, SHOAL_* environment and flags together)",
        )?;
        Ok(c)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug, Default)]
pub struct FormatArg {
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network
    Create {
        /// Driver (only overlay)
        #[arg(long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form (default: the next free /24 of 10.0.0.0/8)
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address (default: the subnet's first address)
        #[arg(long)]
        gateway: Option<String>,
        /// Allow standalone containers to attach
        #[arg(long)]
        attachable: bool,
        /// No way out of the network, no forwarded DNS
        #[arg(long)]
        internal: bool,
        /// Driver option KEY[=VALUE], repeatable: `encrypted` (VXLAN between nodes inside
        /// WireGuard)
        #[arg(long = "opt", short = 'o', value_name = "KEY[=VALUE]")]
        opt: Vec<String>,
        /// Name
        name: String,
    },
    /// List networks
    Ls(FormatArg),
    /// Show a network
    Inspect {
        /// Name
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Remove a network (refused while a service uses it)
    Rm {
        /// Network names
        names: Vec<String>,
    },
}

/// `-f/--follow` and `--tail N` of `logs` and `service logs`.
#[derive(Args, Debug, Clone, Copy)]
pub struct LogOpts {
    /// Follow the output
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines (of each task)
    #[arg(long)]
    tail: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Create a service
    Create(Box<ServiceCreateArgs>),
    /// List services
    Ls(FormatArg),
    /// List a service's tasks
    Ps {
        /// Name
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the output of every task of a service, from whichever node runs it
    /// (`web.1@node2 | ...`)
    Logs {
        #[command(flatten)]
        opts: LogOpts,
        /// Name
        name: String,
    },
    /// Show a service
    Inspect {
        /// Name
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Set replica counts: NAME=N ...
    Scale {
        /// NAME=REPLICAS, one or more
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Change a service
    Update {
        /// Name
        name: String,
        /// New replica count
        #[arg(long)]
        replicas: Option<u32>,
        /// Add a published port (same syntax as --publish)
        #[arg(long)]
        publish_add: Vec<String>,
        /// Remove a published port: PORT or PORT/PROTO
        #[arg(long)]
        publish_rm: Vec<String>,
    },
    /// Remove services
    Rm {
        /// Service names
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct ServiceCreateArgs {
    /// Service name (DNS name on its networks)
    #[arg(long)]
    pub name: String,
    /// NET[,alias=ALIAS]... (repeatable)
    #[arg(long)]
    pub network: Vec<String>,
    /// Number of tasks
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// vip (one virtual IP, kernel load balancing) or dnsrr (DNS answers every task)
    #[arg(long, default_value = "vip")]
    pub endpoint_mode: String,
    /// published=P,target=T[,protocol=tcp|udp][,mode=ingress|host] (repeatable)
    #[arg(long)]
    pub publish: Vec<String>,
    /// P:T[/udp] (repeatable)
    #[arg(short = 'p')]
    pub p: Vec<String>,
    /// KEY=VALUE (repeatable)
    #[arg(long)]
    pub env: Vec<String>,
    /// Health check run in the task (`/bin/sh -c CMD`, exit 0 = healthy); a task joins DNS
    /// and the VIP's backends only once healthy, and leaves them when unhealthy
    #[arg(long)]
    pub health_cmd: Option<String>,
    /// Time between health checks (e.g. 500ms, 2s)
    #[arg(long, default_value = "1s")]
    pub health_interval: String,
    /// Consecutive failed checks that make a task unhealthy
    #[arg(long, default_value_t = 3)]
    pub health_retries: u32,
    /// How the VIP picks a task for a new connection: random, or consistent (by a hash of
    /// the connection: every node picks the same task)
    #[arg(long, default_value = "random")]
    pub lb: String,
    /// Client-IP session affinity: a client's new connections go to the task its last one
    /// went to, for this long (e.g. 10m, 3h; max 24h)
    #[arg(long)]
    pub affinity_timeout: Option<String>,
    /// The OCI image each task runs, as a container through podman (Docker's positional
    /// IMAGE also works)
    #[arg(long)]
    pub image: Option<String>,
    /// IMAGE [CMD]... as `docker service create` takes them
    #[arg(value_name = "IMAGE [CMD]...", allow_hyphen_values = true)]
    pub image_and_command: Vec<String>,
    /// The command each task runs (with an image: instead of the image's command; without
    /// one: a process task of the lab runtime, on the host's filesystem)
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl ServiceCreateArgs {
    /// (image, command) from `--image IMAGE [-- CMD...]`, `IMAGE [CMD...]` or `-- CMD...`.
    pub fn image_and_command(&self) -> anyhow::Result<(Option<String>, Vec<String>)> {
        let (image, mut command) = match (&self.image, self.image_and_command.split_first()) {
            (Some(_), Some((first, _))) => bail!(
                "service create: both --image and a positional image ({first:?}) given; use one, and put the command after --"
            ),
            (Some(i), None) => (Some(i.clone()), vec![]),
            (None, Some((i, rest))) => (Some(i.clone()), rest.to_vec()),
            (None, None) => (None, vec![]),
        };
        if !self.command.is_empty() {
            if !command.is_empty() {
                bail!("service create: a command both after the image and after --; give it once");
            }
            command = self.command.clone();
        }
        if image.is_none() && command.is_empty() {
            bail!("service create needs an image (IMAGE or --image IMAGE) or a command (after --)");
        }
        Ok((image, command))
    }
}

/// `shoal run`: Docker's `docker run --network NET` for containers outside services.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Detach: return once the container runs (otherwise its output follows until it ends)
    #[arg(short, long)]
    pub detach: bool,
    /// Its name, also its DNS name on its networks (default: ctr- and six hex digits)
    #[arg(long)]
    pub name: Option<String>,
    /// NET[,alias=ALIAS]... (repeatable; attachable networks only)
    #[arg(long, required = true)]
    pub network: Vec<String>,
    /// KEY=VALUE (repeatable)
    #[arg(short, long)]
    pub env: Vec<String>,
    /// The image to run
    pub image: String,
    /// The command (default: the image's)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List nodes
    Ls(FormatArg),
    /// What this node's agent has programmed, and its last error
    Inspect,
    /// A new WireGuard key pair for this node (encrypted networks); open flows are kept
    RotateKey,
}

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab cluster
    Up {
        /// Number of nodes
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Cluster store: etcd (a local etcd in the lab) or embedded (one node only)
        #[arg(long, value_enum, default_value_t = StoreArg::Etcd)]
        store: StoreArg,
        /// Lab name (several labs can run side by side)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// DNS server (IP:PORT) the agents forward other names to, e.g. one in the lab's
        /// client namespace; repeatable. None by default: the lab never asks outside.
        #[arg(long = "dns-upstream", value_name = "IP:PORT")]
        dns_upstream: Vec<std::net::SocketAddr>,
        /// The agents' VIP dataplane (`[lb] dataplane`); ipvs needs a kernel with IPVS
        #[arg(long = "lb-dataplane", value_enum, default_value_t = LabDataplane::Nftables)]
        lb_dataplane: LabDataplane,
    },
    /// Remove everything the lab made
    Down {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
    },
    /// Show the lab
    Status {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
    },
    /// Simulate the loss of a node: kill its agent and tasks, cut its underlay link
    Kill {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// Node name, e.g. node2
        node: String,
    },
    /// Bring a killed node back
    Start {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// Node name, e.g. node2
        node: String,
    },
    /// Restart a node's agent (SIGTERM, then start it again): tasks keep running and the new
    /// agent adopts them and the kernel state
    Restart {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// Node name, e.g. node2
        node: String,
    },
    /// Compare publish modes on the lab: host mode, the ingress routing mesh (client IP kept)
    /// and ingress with SNAT, from the client to every node, with task-to-task over the
    /// overlay as the reference; prints a table and writes an HTML report
    Compare {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// Load per target (e.g. 3s, 500ms)
        #[arg(long, default_value = "3s", value_parser = shoal_lab::compare::parse_duration)]
        duration: std::time::Duration,
        /// Where to write the HTML report
        #[arg(long, default_value = "./shoal-compare.html")]
        report: PathBuf,
        /// Print the results as JSON instead of the table
        #[arg(long)]
        json: bool,
        /// Leave the compare services (and network) deployed afterwards
        #[arg(long)]
        keep: bool,
    },
    /// Print a containers.conf that points podman's CNI backend at a lab node's conflists
    /// and the lab's plugin: `CONTAINERS_CONF=FILE podman run --network NET ...`
    PodmanConf {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// The node whose agent attaches the containers
        #[arg(long, default_value = "node1")]
        node: String,
    },
    /// Run a command in a task (web.1), a node (node1) or the client
    Exec {
        /// Lab name (SHOAL_LAB)
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        /// A task (web.1), a node (node1) or `client`
        target: String,
        /// The command and its arguments, after --
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum StoreArg {
    Embedded,
    Etcd,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LabDataplane {
    Nftables,
    Ipvs,
}

/// `NET[,alias=A]...`
pub fn parse_network_attach(s: &str) -> anyhow::Result<NetworkAttach> {
    let mut parts = s.split(',');
    let first = parts.next().unwrap_or_default();
    let network = first.strip_prefix("name=").unwrap_or(first).to_string();
    if network.is_empty() {
        bail!("invalid --network {s:?}: expected NET[,alias=ALIAS]");
    }
    let mut aliases = vec![];
    for p in parts {
        match p.split_once('=') {
            Some(("alias", a)) => aliases.push(a.to_string()),
            _ => bail!("invalid --network option {p:?} in {s:?}: only alias=ALIAS is known"),
        }
    }
    Ok(NetworkAttach { network, aliases })
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn run_client(host: Option<&str>, cmd: Cmd) -> anyhow::Result<()> {
    let c = Client::new(&socket_path(host));
    match cmd {
        Cmd::Network(n) => match n {
            NetworkCmd::Create {
                driver,
                subnet,
                gateway,
                attachable,
                internal,
                opt,
                name,
            } => {
                let options = opt
                    .iter()
                    .map(|o| match o.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => (o.clone(), String::new()),
                    })
                    .collect();
                let net: Network = c
                    .network_create(&NetworkCreate {
                        name,
                        driver: Some(driver),
                        subnet,
                        gateway,
                        attachable,
                        internal,
                        options,
                    })
                    .await?;
                println!("{}", net.id);
            }
            NetworkCmd::Ls(f) => {
                let nets: Vec<Network> = c.networks().await?;
                if f.format == Format::Json {
                    return print_json(&nets);
                }
                table(
                    &[
                        "NETWORK ID",
                        "NAME",
                        "DRIVER",
                        "SUBNET",
                        "GATEWAY",
                        "VNI",
                        "FLAGS",
                    ],
                    nets.iter()
                        .map(|n| {
                            let mut flags = vec![];
                            if n.ingress {
                                flags.push("ingress")
                            }
                            if n.internal {
                                flags.push("internal")
                            }
                            if n.encrypted {
                                flags.push("encrypted")
                            }
                            if n.attachable {
                                flags.push("attachable")
                            }
                            vec![
                                shoal_api::model::short_id(&n.id).to_string(),
                                n.name.clone(),
                                n.driver.clone(),
                                n.subnet.to_string(),
                                n.gateway.to_string(),
                                n.vni.to_string(),
                                flags.join(","),
                            ]
                        })
                        .collect(),
                );
            }
            NetworkCmd::Inspect { name, format: _ } => {
                let net: Network = c.network(&name).await?;
                print_json(&net)?;
            }
            NetworkCmd::Rm { names } => {
                for n in names {
                    c.network_rm(&n).await?;
                    println!("{n}");
                }
            }
        },
        Cmd::Service(s) => match s {
            ServiceCmd::Create(a) => {
                let mut ports = vec![];
                for p in a.publish.iter().chain(a.p.iter()) {
                    ports.push(PortConfig::parse(p)?);
                }
                let networks = a
                    .network
                    .iter()
                    .map(|n| parse_network_attach(n))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let endpoint_mode: EndpointMode = a.endpoint_mode.parse()?;
                let health = match &a.health_cmd {
                    Some(cmd) => Some(HealthCheck {
                        cmd: cmd.clone(),
                        interval_ms: parse_duration_ms(&a.health_interval)?,
                        retries: a.health_retries,
                    }),
                    None => None,
                };
                let lb = LbOptions {
                    selection: a.lb.parse()?,
                    affinity_secs: match &a.affinity_timeout {
                        Some(d) => {
                            let ms = parse_duration_ms(d)?;
                            if ms < 1000 || ms % 1000 != 0 {
                                bail!(
                                    "--affinity-timeout {d}: use whole seconds (e.g. 30s, 10m, 3h)"
                                );
                            }
                            Some(u32::try_from(ms / 1000).map_err(|_| {
                                anyhow::anyhow!("--affinity-timeout {d} is out of range (1s-24h)")
                            })?)
                        }
                        None => None,
                    },
                };
                let (image, command) = a.image_and_command()?;
                let req = ServiceCreate {
                    name: a.name,
                    networks,
                    replicas: a.replicas,
                    endpoint_mode,
                    ports,
                    image,
                    command,
                    env: a.env,
                    health,
                    lb,
                };
                let svc: Service = c.service_create(&req).await?;
                println!("{}", svc.id);
            }
            ServiceCmd::Ls(f) => {
                let svcs: Vec<ServiceStatus> = c.services().await?;
                if f.format == Format::Json {
                    return print_json(&svcs);
                }
                table(
                    &["ID", "NAME", "MODE", "REPLICAS", "PORTS", "VIPS"],
                    svcs.iter()
                        .map(|s| {
                            let v = &s.service;
                            vec![
                                shoal_api::model::short_id(&v.id).to_string(),
                                v.name.clone(),
                                format!(
                                    "replicated/{}",
                                    match v.endpoint_mode {
                                        EndpointMode::Vip => "vip",
                                        EndpointMode::Dnsrr => "dnsrr",
                                    }
                                ),
                                format!("{}/{}", s.running, v.replicas),
                                v.ports
                                    .iter()
                                    .map(|p| p.to_string())
                                    .collect::<Vec<_>>()
                                    .join(","),
                                v.networks
                                    .iter()
                                    .filter_map(|n| n.vip.map(|ip| format!("{}:{ip}", n.network)))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ]
                        })
                        .collect(),
                );
            }
            ServiceCmd::Logs { opts, name } => {
                c.service_logs(&name, opts.tail, opts.follow, &mut std::io::stdout())
                    .await?;
            }
            ServiceCmd::Ps { name, format } => {
                let tasks: Vec<Task> = c.service_tasks(&name).await?;
                let nodes: Vec<Node> = c.nodes().await?;
                if format.format == Format::Json {
                    return print_json(&tasks);
                }
                // Process tasks (no image) run the service's command on the host.
                let image = c
                    .service(&name)
                    .await?
                    .service
                    .image
                    .unwrap_or_else(|| "(process)".into());
                table(
                    &[
                        "ID",
                        "NAME",
                        "IMAGE",
                        "NODE",
                        "DESIRED STATE",
                        "CURRENT STATE",
                        "ADDRESSES",
                        "ERROR",
                    ],
                    tasks
                        .iter()
                        .map(|t| {
                            let node = nodes
                                .iter()
                                .find(|n| n.id == t.node_id)
                                .map(|n| n.name.clone())
                                .unwrap_or_else(|| t.node_id.clone());
                            vec![
                                shoal_api::model::short_id(&t.id).to_string(),
                                t.name(),
                                image.clone(),
                                node,
                                t.desired_state.to_string(),
                                t.state.to_string(),
                                t.networks
                                    .iter()
                                    .map(|n| format!("{}={}", n.network, n.ip))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                t.error.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
            ServiceCmd::Inspect { name, format: _ } => {
                let s: ServiceStatus = c.service(&name).await?;
                print_json(&s)?;
            }
            ServiceCmd::Scale { pairs } => {
                for p in pairs {
                    let (name, n) = p
                        .split_once('=')
                        .with_context(|| format!("invalid scale {p:?}: expected NAME=REPLICAS"))?;
                    let n: u32 = n.parse().map_err(|_| {
                        anyhow::anyhow!("invalid replicas {n:?} for {name}: not a number")
                    })?;
                    let _: Service = c
                        .service_update(
                            name,
                            &ServiceUpdate {
                                replicas: Some(n),
                                ..Default::default()
                            },
                        )
                        .await?;
                    println!("{name} scaled to {n}");
                }
            }
            ServiceCmd::Update {
                name,
                replicas,
                publish_add,
                publish_rm,
            } => {
                let publish_add = publish_add
                    .iter()
                    .map(|p| PortConfig::parse(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let _: Service = c
                    .service_update(
                        &name,
                        &ServiceUpdate {
                            replicas,
                            publish_add,
                            publish_rm,
                        },
                    )
                    .await?;
                println!("{name}");
            }
            ServiceCmd::Rm { names } => {
                for n in names {
                    c.service_rm(&n).await?;
                    println!("{n}");
                }
            }
        },
        Cmd::Node(n) => match n {
            NodeCmd::Ls(f) => {
                let info: serde_json::Value = c.info().await?;
                let nodes: Vec<Node> = c.nodes().await?;
                if f.format == Format::Json {
                    return print_json(&nodes);
                }
                let me = info["node_id"].as_str().unwrap_or_default().to_string();
                table(
                    &["ID", "NAME", "STATUS", "ADDRESS", "VERSION"],
                    nodes
                        .iter()
                        .map(|n| {
                            vec![
                                format!(
                                    "{}{}",
                                    shoal_api::model::short_id(&n.id),
                                    if n.id == me { " *" } else { "" }
                                ),
                                n.name.clone(),
                                format!("{:?}", n.status).to_lowercase(),
                                n.addr.map(|a| a.to_string()).unwrap_or_default(),
                                n.version.clone(),
                            ]
                        })
                        .collect(),
                );
            }
            NodeCmd::Inspect => {
                let v: serde_json::Value = c.node().await?;
                print_json(&v)?;
            }
            NodeCmd::RotateKey => {
                let v: serde_json::Value = c.rotate_key().await?;
                println!("{}", v["public_key"].as_str().unwrap_or_default());
            }
        },
        Cmd::Run(a) => {
            let networks = a
                .network
                .iter()
                .map(|n| parse_network_attach(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ctr: Service = c
                .container_create(&ContainerCreate {
                    name: a.name.clone(),
                    networks,
                    image: a.image.clone(),
                    command: a.command.clone(),
                    env: a.env.clone(),
                })
                .await?;
            // Like `docker run -d`: back once it runs (or with the reason it did not).
            let start = std::time::Instant::now();
            loop {
                let all: Vec<ContainerStatus> = c.containers().await?;
                let me = all.iter().find(|x| x.container.id == ctr.id);
                if let Some(why) = me.and_then(|x| x.container.standalone.as_ref()?.exited.clone())
                {
                    bail!("container {} did not run: {why}", ctr.name);
                }
                if me
                    .and_then(|x| x.task.as_ref())
                    .is_some_and(|t| t.state == TaskState::Running)
                {
                    break;
                }
                if start.elapsed() > std::time::Duration::from_secs(120) {
                    bail!(
                        "container {} is not running after 2 minutes (see shoal ps)",
                        ctr.name
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            println!("{}", ctr.name);
            if !a.detach {
                // Attached: its output until it ends.
                logs(&c, &ctr.name, true, None).await?;
            }
        }
        Cmd::Ps(f) => {
            let all: Vec<ContainerStatus> = c.containers().await?;
            if f.format == Format::Json {
                return print_json(&all);
            }
            let nodes: Vec<Node> = c.nodes().await?;
            table(
                &["ID", "NAME", "IMAGE", "NODE", "STATE", "ADDRESSES", "ERROR"],
                all.iter()
                    .map(|x| {
                        let sa = x.container.standalone.as_ref();
                        let node = sa
                            .and_then(|s| nodes.iter().find(|n| n.id == s.node_id))
                            .map(|n| n.name.clone())
                            .unwrap_or_default();
                        let exited = sa.and_then(|s| s.exited.clone());
                        vec![
                            shoal_api::model::short_id(&x.container.id).to_string(),
                            x.container.name.clone(),
                            // A CNI container's image is its runtime's business.
                            x.container.image.clone().unwrap_or_else(|| {
                                sa.and_then(|s| s.cni.as_ref())
                                    .map(|c| {
                                        format!(
                                            "(cni {})",
                                            shoal_api::model::short_id(&c.container_id)
                                        )
                                    })
                                    .unwrap_or_default()
                            }),
                            node,
                            match (&exited, &x.task) {
                                (Some(_), _) => "exited".into(),
                                (None, Some(t)) => t.state.to_string(),
                                (None, None) => "pending".into(),
                            },
                            x.task
                                .iter()
                                .flat_map(|t| &t.networks)
                                .map(|n| format!("{}={}", n.network, n.ip))
                                .collect::<Vec<_>>()
                                .join(","),
                            exited.unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Rm { names } => {
            for n in names {
                c.container_rm(&n).await?;
                println!("{n}");
            }
        }
        Cmd::Logs { opts, name } => logs(&c, &name, opts.follow, opts.tail).await?,
        _ => unreachable!("not a client command"),
    }
    Ok(())
}

/// `shoal logs`: a container's or a task's output, from whichever node runs it.
async fn logs(c: &Client, name: &str, follow: bool, tail: Option<u32>) -> anyhow::Result<()> {
    // A standalone container's task is `NAME.1`.
    let what = match c
        .containers()
        .await?
        .iter()
        .find(|x| x.container.name == name)
    {
        Some(_) => format!("{name}.1"),
        None => name.to_string(),
    };
    c.task_logs(&what, tail, follow, &mut std::io::stdout())
        .await
}

pub async fn run_lab(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            nodes,
            store,
            name,
            dns_upstream,
            lb_dataplane,
        } => {
            let store = match store {
                StoreArg::Embedded => StoreKind::Embedded,
                StoreArg::Etcd => StoreKind::Etcd,
            };
            let lab = shoal_lab::lab::up(
                &name,
                nodes,
                store,
                &shoal_lab::lab::UpOptions {
                    dns_upstreams: dns_upstream,
                    lb_dataplane: match lb_dataplane {
                        LabDataplane::Nftables => shoal::config::Dataplane::Nftables,
                        LabDataplane::Ipvs => shoal::config::Dataplane::Ipvs,
                    },
                },
            )
            .await?;
            eprintln!(
                "lab {:?} is up: {} node(s), store {:?}, client at 192.0.2.100",
                lab.name,
                lab.nodes.len(),
                lab.store
            );
            println!("export SHOAL_HOST={}", lab.host_env());
        }
        LabCmd::Down { name } => {
            let removed = shoal_lab::lab::down(&name).await?;
            eprintln!(
                "lab {name:?} is down ({} namespaces removed)",
                removed.len()
            );
        }
        LabCmd::Kill { name, node } => {
            shoal_lab::lab::kill(&name, &node)?;
            eprintln!("{node} killed (agent and tasks SIGKILLed, underlay link down)");
        }
        LabCmd::Start { name, node } => {
            shoal_lab::lab::start(&name, &node).await?;
            eprintln!("{node} started");
        }
        LabCmd::Restart { name, node } => {
            shoal_lab::lab::restart(&name, &node).await?;
            eprintln!("{node}: agent restarted");
        }
        LabCmd::Status { name } => {
            let lab = shoal_lab::lab::Lab::load(&name)?;
            table(
                &["NODE", "NAMESPACE", "ADDRESS", "AGENT PID", "SOCKET"],
                lab.nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.netns.clone(),
                            n.addr.to_string(),
                            n.pid.to_string(),
                            n.socket.display().to_string(),
                        ]
                    })
                    .collect(),
            );
            let count = shoal_netns::list()?
                .iter()
                .filter(|n| n.starts_with(&format!("shoal-{name}-")))
                .count();
            println!(
                "namespaces: {count}   client: {}   export SHOAL_HOST={}",
                lab.client_netns,
                lab.host_env()
            );
        }
        LabCmd::Compare {
            name,
            duration,
            report,
            json,
            keep,
        } => {
            let lab = shoal_lab::lab::Lab::load(&name)?;
            let opts = shoal_lab::compare::Options {
                duration,
                keep,
                progress: true,
                ..Default::default()
            };
            let r = shoal_lab::compare::run(&lab, &opts).await?;
            shoal_lab::compare::write_html(&r, &report)?;
            if json {
                print_json(&r)?;
            } else {
                shoal_lab::compare::print(&r);
            }
            eprintln!("report: {}", report.display());
        }
        LabCmd::PodmanConf { name, node } => {
            let lab = shoal_lab::lab::Lab::load(&name)?;
            print!("{}", shoal_lab::lab::podman_conf(&lab, &node)?);
        }
        LabCmd::Exec {
            name,
            target,
            command,
        } => {
            let lab = shoal_lab::lab::Lab::load(&name)?;
            let t = shoal_lab::lab::resolve_target(&lab, &target).await?;
            return Err(shoal_lab::lab::exec(t, &command));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The systemd unit's command line is one the CLI accepts, and keeps tasks alive over
    /// an agent restart.
    #[test]
    fn systemd_unit() {
        let unit = include_str!("../../packaging/shoal-agent.service");
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let mut argv: Vec<&str> = exec.split_whitespace().collect();
        argv[0] = "shoal";
        let cli = Cli::try_parse_from(&argv).unwrap();
        assert!(matches!(cli.command, Cmd::Agent(_)));
        assert!(
            unit.contains("KillMode=process"),
            "tasks must outlive an agent restart"
        );
    }
    use clap::CommandFactory;

    /// `--help` explains every flag and argument of every command.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "shoal", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }

    /// A small xorshift, so the property test needs no extra crate and is reproducible.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub(crate) fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
            v[usize::try_from(self.next() % v.len() as u64).unwrap()]
        }
    }

    /// Parsing never panics, whatever the argument vector (10,000 random ones built from
    /// the commands' words, flags, odd values and junk).
    #[test]
    fn parsing_random_argument_vectors_never_panics() {
        let words = [
            "network",
            "service",
            "node",
            "lab",
            "agent",
            "create",
            "ls",
            "inspect",
            "rm",
            "update",
            "scale",
            "ps",
            "--name",
            "--network",
            "--replicas",
            "-p",
            "--publish",
            "--format",
            "json",
            "table",
            "--subnet",
            "10.0.0.0/24",
            "--gateway",
            "--internal",
            "--attachable",
            "--endpoint-mode",
            "dnsrr",
            "vip",
            "--lb",
            "--env",
            "--health-cmd",
            "-H",
            "--host",
            "web=3",
            "web=",
            "=3",
            "web=-1",
            "8080:80",
            "published=1,target=2",
            "mode=host",
            "65536:1",
            ":",
            "",
            "-",
            "--",
            "-x",
            "--config",
            "/nonexistent",
            "--metrics-addr",
            "x",
            "--lease-ttl-secs",
            "-1",
            "99999999999999999999",
            "\u{0}",
            "é",
            "--help",
            "completion",
            "bash",
            "zsh",
            "version",
            "whoami",
            "--port",
            "0",
            "a,b,c",
            "--publish-add",
            "--publish-rm",
            "--network-add",
            "10.0.0.300/33",
        ];
        let mut rng = Rng(0x5eed_cafe_f00d_1234);
        for _ in 0..10_000 {
            let n = rng.next() % 9;
            let mut argv = vec!["shoal"];
            for _ in 0..n {
                argv.push(rng.pick(&words));
            }
            // Ok or a clap error; a panic fails the test.
            let _ = Cli::try_parse_from(&argv);
        }
    }

    fn create_args(argv: &[&str]) -> anyhow::Result<(Option<String>, Vec<String>)> {
        let mut full = vec!["shoal", "service", "create", "--name", "web"];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(&full)?;
        let Cmd::Service(ServiceCmd::Create(a)) = cli.command else {
            panic!("not service create");
        };
        a.image_and_command()
    }

    /// `--image IMAGE [-- CMD]`, Docker's `IMAGE [CMD...]`, and `-- CMD` for process tasks;
    /// ambiguous or empty forms are refused.
    #[test]
    fn service_create_takes_an_image_in_either_form() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            create_args(&["--image", "localhost/web:1"]).unwrap(),
            (Some("localhost/web:1".into()), v(&[]))
        );
        assert_eq!(
            create_args(&["--image", "busybox", "--", "sleep", "10"]).unwrap(),
            (Some("busybox".into()), v(&["sleep", "10"]))
        );
        assert_eq!(
            create_args(&["--replicas", "2", "busybox", "httpd", "-f", "-p", "80"]).unwrap(),
            (Some("busybox".into()), v(&["httpd", "-f", "-p", "80"]))
        );
        assert_eq!(
            create_args(&["--", "shoal", "whoami"]).unwrap(),
            (None, v(&["shoal", "whoami"]))
        );
        // After a positional IMAGE everything is its command, a `--` too (as in Docker).
        assert_eq!(
            create_args(&["busybox", "echo", "--", "x"]).unwrap(),
            (Some("busybox".into()), v(&["echo", "--", "x"]))
        );
        for bad in [&["--image", "a", "b"][..], &[][..]] {
            assert!(create_args(bad).is_err(), "{bad:?} accepted");
        }
    }
}
