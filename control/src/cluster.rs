//! Cluster operations on the store: every write is one transaction; every allocation is a
//! key created only if absent (compare-and-swap), retried on conflict with fresh reads.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::alloc;
use crate::keys::{
    self, ALIVE, ALLOC_PORT, ALLOC_SUBNETS, ALLOC_VNI, NETWORKS, NODES, SERVICES, TASKS,
};
use crate::store::{Compare, KeyValue, Op, Store, StoreError};
use shoal_api::model::CniAttachment;
use shoal_api::model::{
    EndpointMode, Invalid, Network, Node, PortConfig, Protocol, PublishMode, Service,
    ServiceNetwork, Standalone, Task, TaskState, invalid, new_id, parse_subnet, validate_image,
    validate_name,
};
use shoal_api::wire::{CniRequest, NetworkAttach};
use shoal_api::wire::{ContainerCreate, NetworkCreate, ServiceCreate, ServiceUpdate};

/// The first 12 characters of a container id (as podman and Docker show it).
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Name of the ingress network, created with the cluster.
pub const INGRESS_NETWORK: &str = "ingress";

const MAX_RETRIES: usize = 64;

/// A short random pause before retrying a transaction that lost a race, so that racing
/// writers spread out instead of colliding again.
async fn backoff(attempt: usize) {
    let ms = rand::random_range(1..=(2 + 2 * attempt as u64).min(50));
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Runs a read-compute-write transaction until it commits: the block reads what it needs,
/// puts every precondition of its decision into the compares, and evaluates to `Ok(Some(v))`
/// when its transaction applied, `Ok(None)` when a compare failed (someone else wrote
/// first: read again, after a short random backoff). Errors end it at once. The one retry
/// loop of every cluster write. (A macro, not a function taking an async closure: such a
/// closure's future is not `Send` for every borrow, which axum's handlers need.)
macro_rules! retry_txn {
    ($body:block) => {{
        let mut attempt = 0usize;
        loop {
            if attempt >= MAX_RETRIES {
                break Err(ClusterError::Conflict(
                    "too many concurrent changes; try again".into(),
                ));
            }
            if attempt > 0 {
                backoff(attempt).await;
            }
            attempt += 1;
            let r: Result<Option<_>> = async $body.await;
            if let Some(v) = r? {
                break Ok(v);
            }
        }
    }};
}

/// Errors of cluster operations, mapped to HTTP status codes by the API.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T> = std::result::Result<T, ClusterError>;

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("model types serialise")
}
pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| StoreError::corrupt_because(kv.key.clone(), e).into())
}

pub const MAX_REPLICAS: u32 = 10_000;

/// The cluster's operations, over any store backend.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub store: Arc<dyn Store>,
}

impl Cluster {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Cluster { store }
    }

    async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(T, i64)>> {
        let snap = self.store.list(prefix).await?;
        snap.kvs
            .iter()
            .map(|kv| Ok((decode(kv)?, kv.mod_revision)))
            .collect()
    }

    pub async fn networks(&self) -> Result<Vec<Network>> {
        Ok(self
            .list(NETWORKS)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }
    pub async fn services(&self) -> Result<Vec<Service>> {
        Ok(self
            .list(SERVICES)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }
    pub async fn tasks(&self) -> Result<Vec<Task>> {
        Ok(self
            .list(TASKS)
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }
    /// Nodes, with their status from the liveness keys (ready while the agent holds its lease).
    /// Writes a node record (the agent's own).
    pub async fn put_node(&self, node: &Node) -> Result<()> {
        self.store.put(&keys::node(&node.id), encode(node)).await?;
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<Node>> {
        let alive: HashSet<String> = self
            .store
            .list(ALIVE)
            .await?
            .kvs
            .into_iter()
            .filter_map(|kv| match keys::Record::parse(&kv.key) {
                Some(keys::Record::Alive(id)) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        Ok(self
            .list::<Node>(NODES)
            .await?
            .into_iter()
            .map(|(mut n, _)| {
                n.status = if alive.contains(&n.id) {
                    shoal_api::model::NodeStatus::Ready
                } else {
                    shoal_api::model::NodeStatus::Down
                };
                n
            })
            .collect())
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// The cluster's peer API token: read, or made once (random, 128 bits) by the first
    /// agent to ask. Whoever can read the store has it; nobody else does.
    pub async fn peer_token(&self) -> Result<String> {
        loop {
            if let Some(kv) = self.store.get(keys::PEER_TOKEN).await? {
                return Ok(String::from_utf8_lossy(&kv.value).into_owned());
            }
            let token = format!("{:032x}", rand::random::<u128>());
            self.store
                .txn(
                    vec![Compare::Absent(keys::PEER_TOKEN.into())],
                    vec![Op::Put(keys::PEER_TOKEN.into(), token.into_bytes())],
                )
                .await?;
        }
    }

    pub async fn network(&self, name: &str) -> Result<Network> {
        self.get(&keys::network(name))
            .await?
            .map(|(n, _)| n)
            .ok_or_else(|| ClusterError::NotFound(format!("network {name:?} not found")))
    }

    pub async fn service(&self, name: &str) -> Result<Service> {
        self.get(&keys::service(name))
            .await?
            .map(|(s, _)| s)
            .ok_or_else(|| ClusterError::NotFound(format!("service {name:?} not found")))
    }

    /// Creates a network. Refuses bad names and CIDRs, duplicates and overlapping subnets.
    pub async fn create_network(&self, req: NetworkCreate) -> Result<Network> {
        validate_name("network", &req.name)?;
        if req.name == INGRESS_NETWORK {
            return Err(ClusterError::Conflict(format!(
                "network name {INGRESS_NETWORK:?} is reserved for the ingress network (created with the cluster)"
            )));
        }
        let options = shoal_api::model::NetworkOptions::parse(&req.options)?;
        match req.driver.as_deref() {
            None | Some("overlay") => {}
            Some(d) => {
                return Err(
                    invalid(format!("unsupported network driver {d:?}: only overlay")).into(),
                );
            }
        }
        let subnet = req.subnet.as_deref().map(parse_subnet).transpose()?;
        let gateway: Option<Ipv4Addr> = match req.gateway.as_deref() {
            Some(g) => Some(g.parse().map_err(|_| {
                invalid(format!("invalid gateway {g:?}: expected an IPv4 address"))
            })?),
            None => None,
        };
        if gateway.is_some() && subnet.is_none() {
            return Err(invalid("--gateway needs --subnet").into());
        }
        let ingress_net: Ipv4Net = alloc::INGRESS_SUBNET.parse().expect("constant");
        let key = keys::network(&req.name);
        retry_txn!({
            if self.store.get(&key).await?.is_some() {
                return Err(ClusterError::Conflict(format!(
                    "network {:?} already exists",
                    req.name
                )));
            }
            let subnets_kv = self.store.get(ALLOC_SUBNETS).await?;
            let used: Vec<Ipv4Net> = match &subnets_kv {
                Some(kv) => decode(kv)?,
                None => vec![],
            };
            let subnet = match subnet {
                Some(s) => {
                    if let Some(u) = used.iter().find(|u| alloc::overlaps(u, &s)) {
                        return Err(ClusterError::Conflict(format!(
                            "subnet {s} overlaps {u}, already used by another network"
                        )));
                    }
                    if alloc::overlaps(&s, &ingress_net) {
                        return Err(ClusterError::Conflict(format!(
                            "subnet {s} overlaps {ingress_net}, reserved for the ingress network"
                        )));
                    }
                    s
                }
                None => alloc::pick_subnet(
                    alloc::DEFAULT_POOL.parse().expect("constant"),
                    alloc::DEFAULT_POOL_PREFIX,
                    &used,
                    &[ingress_net],
                )
                .ok_or_else(|| {
                    ClusterError::Conflict(
                        "the default address pool 10.0.0.0/8 is exhausted: give --subnet".into(),
                    )
                })?,
            };
            let gateway = match gateway {
                Some(g) => {
                    if !subnet.contains(&g) || g == subnet.network() || g == subnet.broadcast() {
                        return Err(invalid(format!(
                            "gateway {g} is not a host address of subnet {subnet}"
                        ))
                        .into());
                    }
                    g
                }
                None => alloc::default_gateway(&subnet),
            };
            let vni = self.free_vni().await?;
            let id = new_id();
            let net = Network {
                id: id.clone(),
                name: req.name.clone(),
                driver: "overlay".into(),
                subnet,
                gateway,
                vni,
                attachable: req.attachable,
                internal: req.internal,
                ingress: false,
                encrypted: options.encrypted,
            };
            let mut subnets = used.clone();
            subnets.push(subnet);
            let subnets_cmp = match &subnets_kv {
                Some(kv) => Compare::ModRevision(ALLOC_SUBNETS.into(), kv.mod_revision),
                None => Compare::Absent(ALLOC_SUBNETS.into()),
            };
            let res = self
                .store
                .txn(
                    vec![
                        Compare::Absent(key.clone()),
                        Compare::Absent(keys::vni(vni)),
                        subnets_cmp,
                        Compare::Absent(keys::ip(&id, gateway)),
                    ],
                    vec![
                        Op::Put(key.clone(), encode(&net)),
                        Op::Put(keys::vni(vni), id.clone().into_bytes()),
                        Op::Put(ALLOC_SUBNETS.into(), encode(&subnets)),
                        Op::Put(keys::ip(&id, gateway), b"gateway".to_vec()),
                    ],
                )
                .await?;
            if res.succeeded {
                return Ok(Some(net));
            }
            Ok(None)
        })
    }

    /// The lowest VNI no network holds (claimed by the caller's transaction).
    async fn free_vni(&self) -> Result<u32> {
        let vnis: HashSet<u32> = self
            .store
            .list(ALLOC_VNI)
            .await?
            .kvs
            .iter()
            .filter_map(|kv| keys::parse_vni(&kv.key))
            .collect();
        alloc::pick_vni(&vnis).ok_or_else(|| ClusterError::Conflict("no VNI left".into()))
    }

    /// Creates the ingress network (`ingress`, [`alloc::INGRESS_SUBNET`], a VNI of its own)
    /// unless it exists; every agent calls this at start, the first one wins.
    pub async fn ensure_ingress(&self) -> Result<Network> {
        let key = keys::network(INGRESS_NETWORK);
        retry_txn!({
            if let Some((net, _)) = self.get::<Network>(&key).await? {
                if !net.ingress {
                    return Err(ClusterError::Conflict(format!(
                        "a network named {INGRESS_NETWORK:?} exists and is not the ingress network: published ports cannot work until it is removed"
                    )));
                }
                return Ok(Some(net));
            }
            let subnet: Ipv4Net = alloc::INGRESS_SUBNET.parse().expect("constant");
            let gateway = alloc::default_gateway(&subnet);
            let vni = self.free_vni().await?;
            let id = new_id();
            let net = Network {
                id: id.clone(),
                name: INGRESS_NETWORK.into(),
                driver: "overlay".into(),
                subnet,
                gateway,
                vni,
                attachable: false,
                internal: false,
                ingress: true,
                encrypted: false,
            };
            let res = self
                .store
                .txn(
                    vec![
                        Compare::Absent(key.clone()),
                        Compare::Absent(keys::vni(vni)),
                    ],
                    vec![
                        Op::Put(key.clone(), encode(&net)),
                        Op::Put(keys::vni(vni), id.clone().into_bytes()),
                        Op::Put(keys::ip(&id, gateway), b"gateway".to_vec()),
                    ],
                )
                .await?;
            if res.succeeded {
                return Ok(Some(net));
            }
            Ok(None)
        })
    }

    /// Removes a network; refused while a service uses it.
    pub async fn remove_network(&self, name: &str) -> Result<()> {
        let key = keys::network(name);
        retry_txn!({
            let (net, rev): (Network, i64) = self
                .get(&key)
                .await?
                .ok_or_else(|| ClusterError::NotFound(format!("network {name:?} not found")))?;
            if net.ingress {
                return Err(invalid(format!(
                    "network {name:?} is the ingress network; it lives as long as the cluster"
                ))
                .into());
            }
            let users: Vec<String> = self
                .services()
                .await?
                .into_iter()
                .filter(|s| s.networks.iter().any(|n| n.network_id == net.id))
                .map(|s| s.name)
                .collect();
            if !users.is_empty() {
                return Err(ClusterError::Conflict(format!(
                    "network {name:?} is in use by service(s) {}",
                    users.join(", ")
                )));
            }
            if self
                .tasks()
                .await?
                .iter()
                .any(|t| t.networks.iter().any(|n| n.network_id == net.id))
            {
                return Err(ClusterError::Conflict(format!(
                    "network {name:?} still has tasks shutting down; try again in a moment"
                )));
            }
            let subnets_kv = self.store.get(ALLOC_SUBNETS).await?;
            let mut ops = vec![
                Op::Delete(key.clone()),
                Op::Delete(keys::vni(net.vni)),
                Op::DeletePrefix(keys::ip_prefix(&net.id)),
                Op::Delete(keys::ip_cursor(&net.id)),
            ];
            let mut cmps = vec![Compare::ModRevision(key.clone(), rev)];
            if let Some(kv) = &subnets_kv {
                let mut subnets: Vec<Ipv4Net> = decode(kv)?;
                subnets.retain(|s| *s != net.subnet);
                ops.push(Op::Put(ALLOC_SUBNETS.into(), encode(&subnets)));
                cmps.push(Compare::ModRevision(ALLOC_SUBNETS.into(), kv.mod_revision));
            }
            if self.store.txn(cmps, ops).await?.succeeded {
                return Ok(Some(()));
            }
            Ok(None)
        })
    }

    /// Creates a service: validates, allocates VIPs and published ports in one transaction.
    pub async fn create_service(&self, req: ServiceCreate) -> Result<Service> {
        self.create(req, None).await
    }

    /// Creates a standalone container on `node_id` (`shoal run`): a service record of one
    /// task pinned to that node, DNS round robin (its name is its own address), only on
    /// attachable networks. Its name shares the services' namespace.
    pub async fn create_container(&self, req: ContainerCreate, node_id: &str) -> Result<Service> {
        if req.networks.is_empty() {
            return Err(invalid("shoal run needs --network NET (an attachable network)").into());
        }
        let name = req
            .name
            .unwrap_or_else(|| format!("ctr-{}", &new_id()[..6]));
        self.create(
            ServiceCreate {
                name,
                networks: req.networks,
                replicas: 1,
                endpoint_mode: EndpointMode::Dnsrr,
                image: Some(req.image),
                command: req.command,
                env: req.env,
                ..Default::default()
            },
            Some(Standalone {
                node_id: node_id.to_string(),
                exited: None,
                cni: None,
            }),
        )
        .await
    }

    /// The standalone container a CNI ADD made for (container id, interface), if any.
    pub async fn cni_container(&self, container_id: &str, ifname: &str) -> Result<Option<Service>> {
        Ok(self.containers().await?.into_iter().find(|s| {
            s.standalone
                .as_ref()
                .and_then(|sa| sa.cni.as_ref())
                .is_some_and(|c| c.container_id == container_id && c.ifname == ifname)
        }))
    }

    /// A CNI ADD on `node_id`: a standalone container whose sandbox is the runtime's
    /// namespace `req.netns`, on one attachable network; true when this call made it.
    /// Idempotent: the container already attached with this id, interface and namespace is
    /// returned as it is; a record of an earlier sandbox of it (another namespace: the
    /// runtime made a new one without a DEL; or one that ended) is replaced. A container id
    /// attached with another interface or network is refused (one Shoal network per
    /// container).
    pub async fn attach_cni(&self, req: CniRequest, node_id: &str) -> Result<(Service, bool)> {
        if req.container_id.is_empty() || req.ifname.is_empty() || req.netns.is_empty() {
            return Err(invalid("CNI ADD needs CNI_CONTAINERID, CNI_NETNS and CNI_IFNAME").into());
        }
        let all = self.containers().await?;
        let mine: Vec<(&Service, &Standalone, &CniAttachment)> = all
            .iter()
            .filter_map(|s| {
                let sa = s.standalone.as_ref()?;
                Some((s, sa, sa.cni.as_ref()?))
            })
            .filter(|(_, _, c)| c.container_id == req.container_id)
            .collect();
        if let Some((svc, sa, c)) = mine.iter().find(|(_, _, c)| c.ifname == req.ifname) {
            if sa.exited.is_none() && c.netns == req.netns {
                return Ok(((*svc).clone(), false));
            }
            self.remove_container(&svc.name).await?;
        } else if let Some((other, _, _)) = mine.first() {
            return Err(ClusterError::Conflict(format!(
                "container {} is already attached to Shoal as {:?} (one Shoal network per container through CNI)",
                short(&req.container_id),
                other.name
            )));
        }
        let name = req
            .name
            .clone()
            .unwrap_or_else(|| format!("ctr-{}", short(&req.container_id)));
        self.create(
            ServiceCreate {
                name,
                networks: vec![NetworkAttach {
                    network: req.network.clone(),
                    aliases: req.aliases.clone(),
                }],
                replicas: 1,
                endpoint_mode: EndpointMode::Dnsrr,
                ..Default::default()
            },
            Some(Standalone {
                node_id: node_id.to_string(),
                exited: None,
                cni: Some(CniAttachment {
                    container_id: req.container_id,
                    netns: req.netns,
                    ifname: req.ifname,
                }),
            }),
        )
        .await
        .map(|svc| (svc, true))
    }

    /// Records that a standalone container ended (it is not started again). Nothing is
    /// written when the record changed meanwhile (the next pass sees the new one).
    pub async fn container_exited(&self, svc: &Service, rev: i64, why: String) -> Result<()> {
        let mut svc = svc.clone();
        if let Some(sa) = svc.standalone.as_mut() {
            sa.exited = Some(why);
        }
        let key = keys::service(&svc.name);
        self.store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![Op::Put(key, encode(&svc))],
            )
            .await?;
        Ok(())
    }

    /// Removes a standalone container (its task stops, its name leaves DNS).
    pub async fn remove_container(&self, name: &str) -> Result<()> {
        self.remove(name, true).await
    }

    /// Standalone containers (services are listed by [`Cluster::services`]).
    pub async fn containers(&self) -> Result<Vec<Service>> {
        Ok(self
            .list(SERVICES)
            .await?
            .into_iter()
            .map(|(s, _): (Service, i64)| s)
            .filter(|s| s.standalone.is_some())
            .collect())
    }

    async fn create(&self, req: ServiceCreate, standalone: Option<Standalone>) -> Result<Service> {
        let kind = if standalone.is_some() {
            "container"
        } else {
            "service"
        };
        validate_name(kind, &req.name)?;
        match &req.image {
            Some(image) => validate_image(image)?,
            // A CNI container runs what its own runtime started.
            None if standalone.as_ref().is_some_and(|sa| sa.cni.is_some()) => {}
            None if req.command.is_empty() => {
                return Err(invalid(
                    "service create needs an image (--image IMAGE) or a command (after --)",
                )
                .into());
            }
            None => {}
        }
        if req.replicas > MAX_REPLICAS {
            return Err(invalid(format!(
                "replicas {} is more than the maximum {MAX_REPLICAS}",
                req.replicas
            ))
            .into());
        }
        for e in &req.env {
            if !e.contains('=') || e.starts_with('=') {
                return Err(invalid(format!("invalid --env {e:?}: expected KEY=VALUE")).into());
            }
        }
        let mut seen = HashSet::new();
        for a in &req.networks {
            if !seen.insert(a.network.as_str()) {
                return Err(invalid(format!("network {:?} given twice", a.network)).into());
            }
            for alias in &a.aliases {
                validate_name("alias", alias)?;
            }
        }
        check_ports(&req.ports)?;
        if !req.ports.is_empty() {
            self.ensure_ingress().await?;
        }
        if let Some(h) = &req.health {
            h.validate()?;
        }
        req.lb.validate()?;
        let key = keys::service(&req.name);
        retry_txn!({
            if let Some((other, _)) = self.get::<Service>(&key).await? {
                let other_kind = if other.standalone.is_some() {
                    "container"
                } else {
                    "service"
                };
                return Err(ClusterError::Conflict(if other_kind == kind {
                    format!("{kind} {:?} already exists", req.name)
                } else {
                    format!("the name {:?} is in use by a {other_kind}", req.name)
                }));
            }
            let mut cmps = vec![Compare::Absent(key.clone())];
            let mut ops = vec![];
            let id = new_id();
            let mut networks = vec![];
            for a in &req.networks {
                let (net, rev): (Network, i64) =
                    self.get(&keys::network(&a.network)).await?.ok_or_else(|| {
                        ClusterError::NotFound(format!("network {:?} not found", a.network))
                    })?;
                if net.ingress {
                    return Err(invalid(format!("network {:?} is the ingress network; publish ports instead of attaching to it", a.network)).into());
                }
                if standalone.is_some() && !net.attachable {
                    return Err(invalid(format!(
                        "network {:?} is not attachable: standalone containers join only networks created with --attachable",
                        a.network
                    ))
                    .into());
                }
                cmps.push(Compare::ModRevision(keys::network(&a.network), rev));
                let vip = if req.endpoint_mode == EndpointMode::Vip {
                    Some(
                        self.claim_ip(&net, &format!("vip:{id}"), &mut cmps, &mut ops)
                            .await?,
                    )
                } else {
                    None
                };
                networks.push(ServiceNetwork {
                    network: net.name.clone(),
                    network_id: net.id.clone(),
                    aliases: a.aliases.clone(),
                    vip,
                });
            }
            let ports = self
                .claim_ports(&id, &req.ports, &mut cmps, &mut ops)
                .await?;
            let svc = Service {
                id,
                name: req.name.clone(),
                networks,
                replicas: req.replicas,
                endpoint_mode: req.endpoint_mode,
                ports,
                image: req.image.clone(),
                command: req.command.clone(),
                env: req.env.clone(),
                health: req.health.clone(),
                lb: req.lb,
                standalone: standalone.clone(),
            };
            ops.push(Op::Put(key.clone(), encode(&svc)));
            if self.store.txn(cmps, ops).await?.succeeded {
                return Ok(Some(svc));
            }
            Ok(None)
        })
    }

    /// Picks a free address of the network and adds its claim (and the cursor hint) to a
    /// transaction.
    async fn claim_ip(
        &self,
        net: &Network,
        owner: &str,
        cmps: &mut Vec<Compare>,
        ops: &mut Vec<Op>,
    ) -> Result<Ipv4Addr> {
        let cursor_key = keys::ip_cursor(&net.id);
        // Several claims on one network in one transaction continue from the last one.
        let pending = ops.iter().rev().find_map(|op| match op {
            Op::Put(k, v) if *k == cursor_key => String::from_utf8_lossy(v).parse().ok(),
            _ => None,
        });
        let after = match pending {
            Some(ip) => Some(ip),
            None => self
                .store
                .get(&cursor_key)
                .await?
                .and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok()),
        };
        let mut used = self.used_ips(net).await?;
        for op in ops.iter() {
            if let Op::Put(k, _) = op
                && let Some(ip) = keys::parse_ip(&net.id, k)
            {
                used.insert(ip);
            }
        }
        let ip = alloc::pick_ip_after(&net.subnet, net.gateway, &used, after).ok_or_else(|| {
            ClusterError::Conflict(format!(
                "network {:?} ({}) has no free address left",
                net.name, net.subnet
            ))
        })?;
        cmps.push(Compare::Absent(keys::ip(&net.id, ip)));
        ops.push(Op::Put(keys::ip(&net.id, ip), owner.as_bytes().to_vec()));
        // One cursor write per transaction (etcd refuses a key twice in one transaction).
        let cursor = Op::Put(cursor_key.clone(), ip.to_string().into_bytes());
        match ops
            .iter_mut()
            .find(|op| matches!(op, Op::Put(k, _) if *k == cursor_key))
        {
            Some(op) => *op = cursor,
            None => ops.push(cursor),
        }
        Ok(ip)
    }

    async fn used_ips(&self, net: &Network) -> Result<HashSet<Ipv4Addr>> {
        let used: HashSet<Ipv4Addr> = self
            .store
            .list(&keys::ip_prefix(&net.id))
            .await?
            .kvs
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
            .collect();
        Ok(used)
    }

    /// Adds claims for ingress ports (auto-picking `published: 0`) to a transaction.
    async fn claim_ports(
        &self,
        service_id: &str,
        ports: &[PortConfig],
        cmps: &mut Vec<Compare>,
        ops: &mut Vec<Op>,
    ) -> Result<Vec<PortConfig>> {
        let taken = self.store.list(ALLOC_PORT).await?;
        let owner_of = |p: Protocol, port: u16| {
            taken
                .kvs
                .iter()
                .find(|kv| kv.key == keys::port(p, port))
                .map(|kv| String::from_utf8_lossy(&kv.value).to_string())
        };
        let mut used: HashSet<(Protocol, u16)> = taken
            .kvs
            .iter()
            .filter_map(|kv| keys::parse_port(&kv.key))
            .collect();
        // Ports another service publishes in host mode (ingress ones hold an allocation key)
        // and ports processes listen on, on any node: both are refused, never taken over.
        let others: Vec<Service> = self
            .services()
            .await?
            .into_iter()
            .filter(|s| s.id != service_id)
            .collect();
        // What the nodes say listens is a precondition too: a node record that changes
        // before the transaction makes it read again.
        let node_recs = self.list::<Node>(NODES).await?;
        for (n, rev) in &node_recs {
            cmps.push(Compare::ModRevision(keys::node(&n.id), *rev));
        }
        let nodes: Vec<Node> = node_recs.into_iter().map(|(n, _)| n).collect();
        let conflict = |p: &PortConfig| -> Option<String> {
            if let Some(s) = others.iter().find(|s| {
                s.ports
                    .iter()
                    .any(|o| o.protocol == p.protocol && o.published == p.published)
            }) {
                return Some(format!(
                    "port {}/{} is already published by service {:?}",
                    p.published, p.protocol, s.name
                ));
            }
            let busy: Vec<&str> = nodes
                .iter()
                .filter(|n| n.listening.contains(&(p.protocol, p.published)))
                .map(|n| n.name.as_str())
                .collect();
            (!busy.is_empty()).then(|| {
                format!(
                    "port {}/{} is in use on node(s) {}: a process there listens on it, and publishing would take its traffic",
                    p.published,
                    p.protocol,
                    busy.join(", ")
                )
            })
        };
        let mut out = vec![];
        for p in ports {
            let mut p = *p;
            if p.published != 0
                && let Some(msg) = conflict(&p)
            {
                return Err(ClusterError::Conflict(msg));
            }
            if p.mode == PublishMode::Ingress {
                if p.published == 0 {
                    let free: HashSet<u16> = used
                        .iter()
                        .filter(|(pr, _)| *pr == p.protocol)
                        .map(|(_, port)| *port)
                        .collect();
                    // Skip ports in use in host mode or by a process on some node.
                    let mut free = free;
                    loop {
                        let pick = alloc::pick_port(&free).ok_or_else(|| {
                            ClusterError::Conflict("no free port left in 30000-32767".into())
                        })?;
                        p.published = pick;
                        if conflict(&p).is_none() {
                            break;
                        }
                        free.insert(pick);
                    }
                } else if let Some(owner) = owner_of(p.protocol, p.published) {
                    if owner != service_id {
                        return Err(ClusterError::Conflict(format!(
                            "port {}/{} is already published by another service",
                            p.published, p.protocol
                        )));
                    }
                    out.push(p);
                    continue;
                }
                used.insert((p.protocol, p.published));
                cmps.push(Compare::Absent(keys::port(p.protocol, p.published)));
                ops.push(Op::Put(
                    keys::port(p.protocol, p.published),
                    service_id.as_bytes().to_vec(),
                ));
            } else {
                // Host mode claims the same key: two services racing for one port (in
                // either mode) cannot both commit.
                match owner_of(p.protocol, p.published) {
                    Some(o) if o != service_id => {
                        return Err(ClusterError::Conflict(format!(
                            "port {}/{} is already published by another service",
                            p.published, p.protocol
                        )));
                    }
                    Some(_) => {}
                    None => {
                        cmps.push(Compare::Absent(keys::port(p.protocol, p.published)));
                        ops.push(Op::Put(
                            keys::port(p.protocol, p.published),
                            service_id.as_bytes().to_vec(),
                        ));
                    }
                }
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Scales and changes published ports.
    pub async fn update_service(&self, name: &str, upd: ServiceUpdate) -> Result<Service> {
        if let Some(r) = upd.replicas
            && r > MAX_REPLICAS
        {
            return Err(invalid(format!(
                "replicas {r} is more than the maximum {MAX_REPLICAS}"
            ))
            .into());
        }
        let key = keys::service(name);
        retry_txn!({
            let (mut svc, rev): (Service, i64) = self
                .get(&key)
                .await?
                .ok_or_else(|| ClusterError::NotFound(format!("service {name:?} not found")))?;
            if svc.standalone.is_some() {
                return Err(
                    invalid(format!("{name:?} is a standalone container, not a service")).into(),
                );
            }
            let mut cmps = vec![Compare::ModRevision(key.clone(), rev)];
            let mut ops = vec![];
            if let Some(r) = upd.replicas {
                svc.replicas = r;
            }
            for rm in &upd.publish_rm {
                let (port, proto) = match rm.split_once('/') {
                    Some((p, pr)) => (p, Some(pr.parse::<Protocol>()?)),
                    None => (rm.as_str(), None),
                };
                let port: u16 = port.parse().map_err(|_| {
                    invalid(format!(
                        "invalid --publish-rm {rm:?}: expected PORT[/PROTO]"
                    ))
                })?;
                let before = svc.ports.len();
                let (gone, kept): (Vec<PortConfig>, Vec<PortConfig>) =
                    svc.ports.iter().copied().partition(|p| {
                        p.published == port && proto.is_none_or(|pr| pr == p.protocol)
                    });
                if gone.is_empty() {
                    return Err(ClusterError::NotFound(format!(
                        "service {name:?} does not publish port {rm}"
                    )));
                }
                for p in &gone {
                    ops.push(Op::Delete(keys::port(p.protocol, p.published)));
                }
                svc.ports = kept;
                debug_assert!(svc.ports.len() < before);
            }
            if !upd.publish_add.is_empty() {
                let mut all = svc.ports.clone();
                all.extend(upd.publish_add.iter().copied());
                check_ports(&all)?;
                let added = self
                    .claim_ports(&svc.id, &upd.publish_add, &mut cmps, &mut ops)
                    .await?;
                svc.ports.extend(added);
            }
            // Tasks started before the service published anything get their ingress
            // address now (the node attaches it to the running task).
            let mut task_cmps = vec![];
            if !upd.publish_add.is_empty() {
                let ingress = self.ensure_ingress().await?;
                for kv in self.store.list(TASKS).await?.kvs {
                    let mut t: Task = decode(&kv)?;
                    if t.service_id != svc.id
                        || t.desired_state != TaskState::Running
                        || t.ip_on(&ingress.id).is_some()
                    {
                        continue;
                    }
                    let ip = self
                        .claim_ip(&ingress, &format!("task:{}", t.id), &mut cmps, &mut ops)
                        .await?;
                    t.networks.push(shoal_api::model::TaskNetwork {
                        network: ingress.name.clone(),
                        network_id: ingress.id.clone(),
                        ip,
                        mac: shoal_api::model::mac_string(shoal_api::model::mac_for(ip)),
                    });
                    task_cmps.push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
                    ops.push(Op::Put(kv.key.clone(), encode(&t)));
                }
            }
            cmps.extend(task_cmps);
            ops.push(Op::Put(key.clone(), encode(&svc)));
            if self.store.txn(cmps, ops).await?.succeeded {
                return Ok(Some(svc));
            }
            Ok(None)
        })
    }

    /// Removes a service and releases its VIPs and ports; its tasks are shut down by the
    /// orchestrator and removed by their nodes.
    pub async fn remove_service(&self, name: &str) -> Result<()> {
        self.remove(name, false).await
    }

    async fn remove(&self, name: &str, container: bool) -> Result<()> {
        let key = keys::service(name);
        let kind = if container { "container" } else { "service" };
        retry_txn!({
            let (svc, rev): (Service, i64) = self
                .get(&key)
                .await?
                .ok_or_else(|| ClusterError::NotFound(format!("{kind} {name:?} not found")))?;
            if svc.standalone.is_some() != container {
                return Err(invalid(if container {
                    format!(
                        "{name:?} is a service, not a standalone container: use shoal service rm"
                    )
                } else {
                    format!("{name:?} is a standalone container, not a service: use shoal rm")
                })
                .into());
            }
            let mut ops = vec![
                Op::Delete(key.clone()),
                Op::DeletePrefix(keys::slots_prefix(&svc.id)),
            ];
            for n in &svc.networks {
                if let Some(vip) = n.vip {
                    ops.push(Op::Delete(keys::ip(&n.network_id, vip)));
                }
            }
            for p in &svc.ports {
                ops.push(Op::Delete(keys::port(p.protocol, p.published)));
            }
            if self
                .store
                .txn(vec![Compare::ModRevision(key.clone(), rev)], ops)
                .await?
                .succeeded
            {
                return Ok(Some(()));
            }
            Ok(None)
        })
    }

    /// Tasks of one service, sorted by slot.
    pub async fn service_tasks(&self, name: &str) -> Result<Vec<Task>> {
        let svc = self.service(name).await?;
        let mut tasks: Vec<Task> = self
            .tasks()
            .await?
            .into_iter()
            .filter(|t| t.service_id == svc.id)
            .collect();
        tasks.sort_by_key(|t| (t.slot, t.id.clone()));
        Ok(tasks)
    }

    /// A task by `web.1`, full name or id (the running one when a slot has several).
    pub async fn find_task(&self, what: &str) -> Result<Task> {
        let tasks = self.tasks().await?;
        pick_task(tasks.iter(), what)
    }

    /// Creates a task for a slot; see [`Cluster::create_tasks`].
    pub async fn create_task(
        &self,
        svc: &Service,
        svc_rev: i64,
        slot: u32,
        node_id: &str,
        nets: &[&Network],
    ) -> Result<Option<Task>> {
        let mut made = self
            .create_tasks(svc, svc_rev, &[(slot, node_id.to_string())], nets)
            .await?;
        Ok(made.pop())
    }

    /// Creates tasks for slots of one service (slot, node), with one address per network
    /// each, all claimed in ONE transaction with the tasks and their slots. Slots that
    /// already hold a task meant to run are skipped; nothing is written if the service or
    /// any claimed key changed meanwhile (the caller's next pass retries).
    pub async fn create_tasks(
        &self,
        svc: &Service,
        svc_rev: i64,
        placements: &[(u32, String)],
        nets: &[&Network],
    ) -> Result<Vec<Task>> {
        let mut cmps = vec![Compare::ModRevision(keys::service(&svc.name), svc_rev)];
        let mut ops = vec![];
        let mut tasks = vec![];
        for (slot, node_id) in placements {
            let id = new_id();
            let slot_key = keys::slot(&svc.id, *slot);
            match self.store.get(&slot_key).await? {
                Some(kv) => {
                    let holder = String::from_utf8_lossy(&kv.value).to_string();
                    if let Some((t, _)) = self.get::<Task>(&keys::task(&holder)).await?
                        && t.desired_state == TaskState::Running
                    {
                        continue;
                    }
                    cmps.push(Compare::ModRevision(slot_key.clone(), kv.mod_revision));
                }
                None => cmps.push(Compare::Absent(slot_key.clone())),
            }
            ops.push(Op::Put(slot_key, id.clone().into_bytes()));
            let mut networks = vec![];
            let mut attach: Vec<&Network> = vec![];
            for sn in &svc.networks {
                let Some(net) = nets.iter().copied().find(|n| n.id == sn.network_id) else {
                    return Ok(vec![]);
                };
                attach.push(net);
            }
            // Published ports (either mode) reach tasks through the ingress network, last so
            // that the task's default route stays on its first own network.
            if !svc.ports.is_empty() {
                match nets.iter().copied().find(|n| n.ingress) {
                    Some(ing) => attach.push(ing),
                    None => return Ok(vec![]),
                }
            }
            for net in attach {
                let ip = self
                    .claim_ip(net, &format!("task:{id}"), &mut cmps, &mut ops)
                    .await?;
                networks.push(shoal_api::model::TaskNetwork {
                    network: net.name.clone(),
                    network_id: net.id.clone(),
                    ip,
                    mac: shoal_api::model::mac_string(shoal_api::model::mac_for(ip)),
                });
            }
            let task = Task {
                id: id.clone(),
                service_id: svc.id.clone(),
                service_name: svc.name.clone(),
                slot: *slot,
                node_id: node_id.clone(),
                desired_state: TaskState::Running,
                state: TaskState::New,
                networks,
                error: None,
                health: svc
                    .health
                    .as_ref()
                    .map(|_| shoal_api::model::Health::Starting),
            };
            ops.push(Op::Put(keys::task(&id), encode(&task)));
            cmps.push(Compare::Absent(keys::task(&id)));
            tasks.push(task);
        }
        if tasks.is_empty() || !self.store.txn(cmps, ops).await?.succeeded {
            return Ok(vec![]);
        }
        Ok(tasks)
    }

    /// Writes tasks in one transaction if none has changed since its revision.
    pub async fn cas_tasks(&self, tasks: &[(Task, i64)]) -> Result<bool> {
        let (cmps, ops) = tasks
            .iter()
            .map(|(t, rev)| {
                let key = keys::task(&t.id);
                (
                    Compare::ModRevision(key.clone(), *rev),
                    Op::Put(key, encode(t)),
                )
            })
            .unzip();
        Ok(self.store.txn(cmps, ops).await?.succeeded)
    }

    /// Deletes a task and releases its addresses.
    pub async fn delete_task(&self, task: &Task) -> Result<()> {
        retry_txn!({
            let mut ops = vec![Op::Delete(keys::task(&task.id))];
            for n in &task.networks {
                ops.push(Op::Delete(keys::ip(&n.network_id, n.ip)));
            }
            // Free the slot only if this task still holds it.
            let slot_key = keys::slot(&task.service_id, task.slot);
            let mut cmps = vec![];
            if let Some(kv) = self.store.get(&slot_key).await?
                && kv.value == task.id.as_bytes()
            {
                cmps.push(Compare::ModRevision(slot_key.clone(), kv.mod_revision));
                ops.push(Op::Delete(slot_key));
            }
            if self.store.txn(cmps, ops).await?.succeeded {
                return Ok(Some(()));
            }
            Ok(None)
        })
    }

    /// Read-modify-write of one task record, retried when someone else wrote it first:
    /// `change` gets the current record and returns the new one, or None when there is
    /// nothing to change (the record is already past it). Returns the record written, or
    /// None when the task is gone or `change` declined.
    pub async fn update_task(
        &self,
        id: &str,
        change: impl Fn(&Task) -> Option<Task>,
    ) -> Result<Option<Task>> {
        let key = keys::task(id);
        retry_txn!({
            let Some((t, rev)) = self.get::<Task>(&key).await? else {
                return Ok(Some(None));
            };
            let Some(new) = change(&t) else {
                return Ok(Some(None));
            };
            if self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), rev)],
                    vec![Op::Put(key.clone(), encode(&new))],
                )
                .await?
                .succeeded
            {
                return Ok(Some(Some(new)));
            }
            Ok(None)
        })
    }
}

/// A task by `web.1`, full name or id; the running one when a slot has several.
pub fn pick_task<'a>(tasks: impl Iterator<Item = &'a Task>, what: &str) -> Result<Task> {
    let mut found: Vec<&Task> = tasks
        .filter(|t| t.id == what || t.full_name() == what || t.name() == what)
        .collect();
    found.sort_by_key(|t| {
        (
            t.desired_state != TaskState::Running,
            t.state != TaskState::Running,
        )
    });
    found
        .first()
        .map(|t| (*t).clone())
        .ok_or_else(|| ClusterError::NotFound(format!("task {what:?} not found")))
}

/// Published ports of one service must not repeat a (published, protocol) pair.
fn check_ports(ports: &[PortConfig]) -> std::result::Result<(), Invalid> {
    let mut seen = HashSet::new();
    for p in ports {
        if p.published != 0 && !seen.insert((p.published, p.protocol)) {
            return Err(invalid(format!(
                "port {}/{} is published twice",
                p.published, p.protocol
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;
    use shoal_api::wire::NetworkAttach;

    fn host_port(port: u16) -> PortConfig {
        PortConfig {
            published: port,
            target: 80,
            protocol: Protocol::Tcp,
            mode: PublishMode::Host,
            snat: false,
        }
    }

    fn web(name: &str, port: PortConfig) -> ServiceCreate {
        ServiceCreate {
            name: name.into(),
            // dnsrr: no VIP to allocate, whose address claims would order the racers.
            networks: vec![NetworkAttach {
                network: "appnet".into(),
                aliases: vec![],
            }],
            endpoint_mode: EndpointMode::Dnsrr,
            replicas: 1,
            ports: vec![port],
            command: vec!["shoal".into(), "whoami".into()],
            ..Default::default()
        }
    }

    /// Bug 4: ten services created at once, each publishing one host-mode port: exactly
    /// one wins, the nine others are refused (the check used to read without a compare, so
    /// several could commit). The same for a port taken in ingress mode by one racer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ten_concurrent_creates_of_one_host_port_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cluster::new(Arc::new(EmbeddedStore::open(dir.path()).unwrap()));
        c.create_network(NetworkCreate {
            name: "appnet".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.ensure_ingress().await.unwrap();
        for (round, ingress_racer) in [(0u16, false), (1, true)] {
            let port = 8081 + round;
            let barrier = Arc::new(tokio::sync::Barrier::new(10));
            let mut joins = vec![];
            for i in 0..10 {
                let (c, b) = (c.clone(), barrier.clone());
                let mut p = host_port(port);
                if ingress_racer && i == 0 {
                    p.mode = PublishMode::Ingress;
                }
                joins.push(tokio::spawn(async move {
                    b.wait().await;
                    c.create_service(web(&format!("s{round}x{i}"), p)).await
                }));
            }
            let mut won = 0;
            for j in joins {
                match j.await.unwrap() {
                    Ok(_) => won += 1,
                    Err(ClusterError::Conflict(m)) => {
                        assert!(m.contains(&port.to_string()), "{m}")
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            assert_eq!(won, 1, "round {round}: exactly one create wins port {port}");
            let holders: Vec<Service> = c
                .services()
                .await
                .unwrap()
                .into_iter()
                .filter(|s| s.ports.iter().any(|p| p.published == port))
                .collect();
            assert_eq!(holders.len(), 1);
            // Removing the winner frees the port for the next one.
            c.remove_service(&holders[0].name).await.unwrap();
            c.create_service(web(&format!("again{round}"), host_port(port)))
                .await
                .unwrap();
        }
    }
}
