//! The IPVS dataplane: the same [`Ruleset`](crate::Ruleset) input as the nft one, programmed
//! into the kernel's IP Virtual Server over generic netlink (family `"IPVS"`).
//!
//! No Rust crate speaks the IPVS generic-netlink family (netlink-packet-generic models only the
//! controller; the genetlink crate only resolves family ids), so this module is our own small
//! client written from linux/ip_vs.h: [`wire`] builds and parses the messages (pure, unit-tested
//! byte for byte), [`IpvsClient`] sends them over a `NETLINK_GENERIC` socket opened inside a
//! network namespace, [`plan`] diffs what the kernel has against what is wanted, and [`apply`]
//! executes the plan.
//!
//! Mapping of a [`VirtualService`](crate::VirtualService) (see [`desired_services`]):
//! - a specific port becomes a `(protocol, VIP, port)` service, scheduler `rr` by default,
//!   each backend a masquerading destination at `target_port`, weight 1;
//! - port 0 ("every port of the protocol", Swarm's VIP semantics) becomes a **firewall-mark
//!   service**: IPVS matches a fwmark service before any address service, and its destinations
//!   have port 0, meaning "the packet's own destination port". The mark is
//!   [`fwmark_for`]`(vip, protocol)`, set by the companion nft table ([`companion_script`]);
//! - `Consistent` selection → `mh` with port hashing, `affinity` → persistence, draining
//!   backends → weight 0.
//!
//! [`sync`] is the dataplane's applier (what the agent calls with `lb.dataplane = "ipvs"`):
//! IPVS services through the planner, the sysctls IPVS's NAT needs, and the companion table.
//!
//! The kernel in the development VM has no IPVS: [`IpvsClient::open_in`] then returns
//! [`IpvsError::NoIpvs`]. `scripts/ipvs-vm.sh` boots Debian's cloud kernel (which has it) under
//! qemu to test against a real one.

mod companion;
mod plan;
mod socket;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr};

pub use companion::{COMPANION_COMMENT, COMPANION_TABLE, companion_script};
pub use plan::{
    FWMARK_BASE, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED_MH_PORT, IP_VS_SVC_F_SCHED_SH_PORT,
    IpvsOptions, Op, apply_plan, desired_services, fwmark_for, plan,
};

use crate::{Protocol, Ruleset};

/// How a service is identified: `(protocol, address, port)` or a firewall mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Addr {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// Matches packets carrying `mark` (IPv4 or IPv6), whatever their protocol and port.
    Fwmark { ipv6: bool, mark: u32 },
}

impl ServiceKey {
    pub fn is_ipv6(&self) -> bool {
        match self {
            ServiceKey::Addr { addr, .. } => addr.is_ipv6(),
            ServiceKey::Fwmark { ipv6, .. } => *ipv6,
        }
    }

    pub fn tcp(addr: Ipv4Addr, port: u16) -> ServiceKey {
        ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: addr.into(),
            port,
        }
    }

    pub fn udp(addr: Ipv4Addr, port: u16) -> ServiceKey {
        ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: addr.into(),
            port,
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceKey::Addr {
                protocol,
                addr: IpAddr::V6(a),
                port,
            } => write!(f, "{protocol} [{a}]:{port}"),
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            } => write!(f, "{protocol} {addr}:{port}"),
            ServiceKey::Fwmark { ipv6, mark } => {
                write!(f, "fwmark {mark}{}", if *ipv6 { " (ipv6)" } else { "" })
            }
        }
    }
}

/// IPVS scheduler (`IPVS_SVC_ATTR_SCHED_NAME`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheduler {
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Source hashing (flags: `IP_VS_SVC_F_SCHED_SH_FALLBACK` 0x8, `..._SH_PORT` 0x10).
    Sh,
    /// Maglev hashing.
    Mh,
    /// Any other scheduler module by name (`lc`, `wlc`, ...).
    Other(String),
}

impl Scheduler {
    pub fn name(&self) -> &str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
            Scheduler::Other(s) => s,
        }
    }

    pub fn from_name(s: &str) -> Scheduler {
        match s {
            "rr" => Scheduler::Rr,
            "wrr" => Scheduler::Wrr,
            "sh" => Scheduler::Sh,
            "mh" => Scheduler::Mh,
            other => Scheduler::Other(other.to_string()),
        }
    }
}

/// A virtual service and its options.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub key: ServiceKey,
    pub scheduler: Scheduler,
    /// `IP_VS_SVC_F_*` (persistent 0x1, one-packet 0x4, scheduler flags); the kernel's own
    /// `HASHED` bit is dropped when listing.
    pub flags: u32,
    /// Persistence timeout in seconds (with `IP_VS_SVC_F_PERSISTENT`).
    pub timeout: u32,
    /// Persistence netmask: for IPv4 the mask as a number (`0xffff_ffff`), for IPv6 a prefix
    /// length (the kernel reads the field differently per family).
    pub netmask: u32,
}

impl Service {
    /// A service with no persistence, as `ipvsadm -A` makes it.
    pub fn new(key: ServiceKey, scheduler: Scheduler) -> Service {
        let netmask = if key.is_ipv6() { 128 } else { u32::MAX };
        Service {
            key,
            scheduler,
            flags: 0,
            timeout: 0,
            netmask,
        }
    }
}

/// Forwarding method of a destination (`IP_VS_CONN_F_*` & `IP_VS_CONN_F_FWD_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FwdMethod {
    /// NAT (`IP_VS_CONN_F_MASQ` = 0): what Shoal uses.
    Masquerade = 0,
    Local = 1,
    Tunnel = 2,
    DirectRoute = 3,
    Bypass = 4,
}

impl FwdMethod {
    pub fn from_u32(v: u32) -> FwdMethod {
        match v {
            1 => FwdMethod::Local,
            2 => FwdMethod::Tunnel,
            3 => FwdMethod::DirectRoute,
            4 => FwdMethod::Bypass,
            _ => FwdMethod::Masquerade,
        }
    }
}

/// A real server of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    pub addr: IpAddr,
    /// 0 in a fwmark service: the packet's own destination port.
    pub port: u16,
    pub fwd: FwdMethod,
    /// 0 = quiesced (no new connections).
    pub weight: u32,
    /// Connection thresholds, 0 = none.
    pub upper_threshold: u32,
    pub lower_threshold: u32,
}

impl Dest {
    pub fn masq(addr: IpAddr, port: u16, weight: u32) -> Dest {
        Dest {
            addr,
            port,
            fwd: FwdMethod::Masquerade,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }

    pub fn key(&self) -> DestKey {
        DestKey {
            addr: self.addr,
            port: self.port,
        }
    }
}

/// How a destination is identified within its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    pub addr: IpAddr,
    pub port: u16,
}

/// A service with its destinations: what [`IpvsClient::list`] returns and [`plan`] takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceWithDests {
    pub service: Service,
    pub dests: Vec<Dest>,
}

/// Errors of the IPVS client. The kernel's errno is always kept.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The generic-netlink controller does not know "IPVS".
    #[error(
        "this kernel has no IPVS (generic netlink family \"IPVS\" not found; modprobe ip_vs) in network namespace {netns:?}"
    )]
    NoIpvs { netns: String },
    /// NEW_SERVICE / NEW_DEST of something that is already there (EEXIST).
    #[error("IPVS {op} {what}: already exists")]
    Exists { op: &'static str, what: String },
    /// SET/DEL/GET of a service (ESRCH) or destination (ENOENT) that is not there.
    #[error("IPVS {op} {what}: no such {}", if *.errno == libc::ESRCH { "service" } else { "destination" })]
    NotFound {
        op: &'static str,
        what: String,
        errno: i32,
    },
    /// NEW/SET_SERVICE answered ENOENT: the kernel has no such scheduler (module
    /// `ip_vs_<name>` not loaded and not loadable). A missing service is ESRCH → NotFound.
    #[error(
        "IPVS {op} {what}: the kernel has no scheduler {scheduler:?} (modprobe ip_vs_{scheduler})"
    )]
    UnknownScheduler {
        op: &'static str,
        what: String,
        scheduler: String,
    },
    /// Any other refusal of the kernel (EINVAL for a bad scheduler name, ERANGE, EPERM, ...).
    #[error("IPVS {op} {what}: {source}")]
    Kernel {
        op: &'static str,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The netlink socket itself failed.
    #[error("IPVS netlink socket ({what}): {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A reply that does not parse.
    #[error("IPVS: malformed netlink reply: {0}")]
    Decode(String),
    /// The desired services cannot be expressed (fwmark collision, ...).
    #[error("IPVS: invalid desired state: {0}")]
    Invalid(String),
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
    /// A sysctl IPVS needs could not be set in the namespace.
    #[error("IPVS: setting {key}={value} in network namespace {netns:?}: {source}")]
    Sysctl {
        netns: String,
        key: &'static str,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The companion nft table (fwmarks, hairpin masquerade) was refused.
    #[error("IPVS companion nft table: {0}")]
    Companion(#[source] crate::LbError),
}

impl From<crate::netlink::DecodeError> for IpvsError {
    fn from(e: crate::netlink::DecodeError) -> IpvsError {
        IpvsError::Decode(e.0)
    }
}

impl IpvsError {
    fn from_errno(op: &'static str, what: String, errno: i32) -> IpvsError {
        match errno {
            libc::EEXIST => IpvsError::Exists { op, what },
            libc::ENOENT | libc::ESRCH => IpvsError::NotFound { op, what, errno },
            _ => IpvsError::Kernel {
                op,
                what,
                source: std::io::Error::from_raw_os_error(errno),
            },
        }
    }
}

/// A generic-netlink socket talking to the IPVS family of one network namespace. Blocking;
/// not shared between threads (wrap it in a mutex, or open one per task).
pub struct IpvsClient {
    sock: socket::NlSocket,
    family: u16,
    seq: u32,
}

impl IpvsClient {
    /// Opens a client for the network namespace `netns` (a name under /run/netns or a path
    /// such as `/proc/self/ns/net`): the socket is created on a thread inside it and stays
    /// there. [`IpvsError::NoIpvs`] when the kernel has no IPVS.
    pub fn open_in(netns: &str) -> Result<IpvsClient, IpvsError> {
        let sock = shoal_netns::run_in(netns, socket::open)??;
        IpvsClient::with_socket(sock, netns)
    }

    /// Opens a client in the calling thread's network namespace.
    pub fn open() -> Result<IpvsClient, IpvsError> {
        IpvsClient::with_socket(socket::open()?, "(current)")
    }

    fn with_socket(sock: socket::NlSocket, netns: &str) -> Result<IpvsClient, IpvsError> {
        let mut c = IpvsClient {
            sock,
            family: 0,
            seq: 1,
        };
        let seq = c.next_seq();
        let req = wire::get_family(seq, wire::IPVS_GENL_NAME);
        let mut family = None;
        let r = c.sock.request(&req, seq, |m| {
            family = Some(wire::parse_family_id(m.payload)?);
            Ok(())
        });
        match r {
            Ok(()) => {}
            Err(socket::ReqError::Errno(libc::ENOENT)) => {
                return Err(IpvsError::NoIpvs {
                    netns: netns.to_string(),
                });
            }
            Err(e) => return Err(e.into_ipvs("resolve family", "IPVS".into())),
        }
        c.family =
            family.ok_or_else(|| IpvsError::Decode("no reply to CTRL_CMD_GETFAMILY".into()))?;
        Ok(c)
    }

    /// The numeric generic-netlink family id the kernel gave "IPVS".
    pub fn family_id(&self) -> u16 {
        self.family
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn ack(
        &mut self,
        req: Vec<u8>,
        seq: u32,
        op: &'static str,
        what: String,
    ) -> Result<(), IpvsError> {
        self.sock
            .request(&req, seq, |_| Ok(()))
            .map_err(|e| e.into_ipvs(op, what))
    }

    /// Every service (GET_SERVICE dump). Services we cannot represent (SCTP, ...) are skipped.
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let seq = self.next_seq();
        let req = wire::dump_services(self.family, seq);
        let mut out = vec![];
        self.sock
            .request(&req, seq, |m| {
                if let Some(s) = wire::parse_service(m.payload)? {
                    out.push(s);
                }
                Ok(())
            })
            .map_err(|e| e.into_ipvs("list services", String::new()))?;
        Ok(out)
    }

    /// The destinations of one service (GET_DEST dump).
    pub fn dests(&mut self, key: &ServiceKey) -> Result<Vec<Dest>, IpvsError> {
        let seq = self.next_seq();
        let req = wire::dump_dests(self.family, seq, key);
        let mut out = vec![];
        let v6 = key.is_ipv6();
        self.sock
            .request(&req, seq, |m| {
                out.push(wire::parse_dest(m.payload, v6)?);
                Ok(())
            })
            .map_err(|e| e.into_ipvs("list destinations of", key.to_string()))?;
        Ok(out)
    }

    /// Every service with its destinations, sorted (services by key, dests by address/port).
    pub fn list(&mut self) -> Result<Vec<ServiceWithDests>, IpvsError> {
        let mut out = vec![];
        for service in self.services()? {
            let mut dests = self.dests(&service.key)?;
            dests.sort();
            out.push(ServiceWithDests { service, dests });
        }
        out.sort_by_key(|a| a.service.key);
        Ok(out)
    }

    pub fn add_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        let r = self.ack(
            wire::new_service(self.family, seq, s),
            seq,
            "add service",
            s.key.to_string(),
        );
        scheduler_error(r, s)
    }

    /// Changes scheduler, flags, timeout and netmask of an existing service.
    pub fn update_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        let r = self.ack(
            wire::set_service(self.family, seq, s),
            seq,
            "update service",
            s.key.to_string(),
        );
        scheduler_error(r, s)
    }

    /// Deletes a service and its destinations.
    pub fn del_service(&mut self, key: &ServiceKey) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        self.ack(
            wire::del_service(self.family, seq, key),
            seq,
            "delete service",
            key.to_string(),
        )
    }

    pub fn add_dest(&mut self, key: &ServiceKey, d: &Dest) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        let what = dest_what(key, &d.key());
        self.ack(
            wire::new_dest(self.family, seq, key, d),
            seq,
            "add destination",
            what,
        )
    }

    /// Changes forwarding method, weight and thresholds of an existing destination.
    pub fn update_dest(&mut self, key: &ServiceKey, d: &Dest) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        let what = dest_what(key, &d.key());
        self.ack(
            wire::set_dest(self.family, seq, key, d),
            seq,
            "update destination",
            what,
        )
    }

    pub fn del_dest(&mut self, key: &ServiceKey, d: &DestKey) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        let what = dest_what(key, d);
        self.ack(
            wire::del_dest(self.family, seq, key, d),
            seq,
            "delete destination",
            what,
        )
    }

    /// Deletes every service of the namespace (IPVS_CMD_FLUSH).
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        let seq = self.next_seq();
        self.ack(wire::flush(self.family, seq), seq, "flush", String::new())
    }

    /// Executes one planned operation.
    pub fn execute(&mut self, op: &Op) -> Result<(), IpvsError> {
        match op {
            Op::AddService(s) => self.add_service(s),
            Op::UpdateService(s) => self.update_service(s),
            Op::DelService(k) => self.del_service(k),
            Op::AddDest(k, d) => self.add_dest(k, d),
            Op::UpdateDest(k, d) => self.update_dest(k, d),
            Op::DelDest(k, d) => self.del_dest(k, d),
        }
    }
}

/// On NEW/SET_SERVICE the kernel says ENOENT for an unknown scheduler (a missing service is
/// ESRCH).
fn scheduler_error(r: Result<(), IpvsError>, s: &Service) -> Result<(), IpvsError> {
    match r {
        Err(IpvsError::NotFound {
            op,
            what,
            errno: libc::ENOENT,
        }) => Err(IpvsError::UnknownScheduler {
            op,
            what,
            scheduler: s.scheduler.name().to_string(),
        }),
        r => r,
    }
}

fn dest_what(key: &ServiceKey, d: &DestKey) -> String {
    match d.addr {
        IpAddr::V6(a) => format!("{key} -> [{a}]:{}", d.port),
        a => format!("{key} -> {a}:{}", d.port),
    }
}

/// Makes the IPVS table of namespace `netns` equal to `rs` (see [`desired_services`]): lists
/// what is there, plans the difference and executes it. Returns the operations done. IPVS has
/// no transactions: on an error the operations before it stay applied; the next call converges.
pub fn apply(netns: &str, rs: &Ruleset, opts: &IpvsOptions) -> Result<Vec<Op>, IpvsError> {
    let desired = desired_services(rs, opts)?;
    let mut c = IpvsClient::open_in(netns)?;
    apply_plan(&mut c, &desired)
}

/// The sysctls [`sync`] sets in the namespace (IPVS ones exist once `ip_vs` is loaded):
///
/// - `net.ipv4.vs.conntrack=1`: IPVS keeps conntrack entries for its NAT connections, so
///   netfilter sees them (the companion's hairpin masquerade works on them);
/// - `net.ipv4.vs.expire_nodest_conn=1`: a packet of a connection whose destination was
///   removed expires that connection (dropped, the client retries) instead of being sent to
///   nowhere until its IPVS timeout;
/// - `net.ipv4.vs.expire_quiescent_template=1`: a draining (weight 0) destination gets no new
///   connections through a persistence template either (as the nft dataplane's affinity);
/// - `net.ipv4.ip_forward=1`: replies of remote backends are forwarded back to the clients
///   (the mesh sets it too).
pub const SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
];

fn set_sysctls(netns: &str) -> Result<(), IpvsError> {
    shoal_netns::run_in(netns, || {
        for (key, value) in SYSCTLS {
            let file = format!("/proc/sys/{key}");
            let res = match std::fs::read_to_string(&file) {
                Ok(cur) if cur.trim() == value => Ok(()),
                _ => std::fs::write(&file, value),
            };
            res.map_err(|source| (key, value, source))?;
        }
        Ok(())
    })?
    .map_err(|(key, value, source)| IpvsError::Sysctl {
        netns: netns.to_string(),
        key,
        value,
        source,
    })
}

/// The IPVS dataplane's applier: makes namespace `netns` serve `rs` through IPVS.
///
/// 1. [`desired_services`] (pure; invalid input fails before anything is touched, as does
///    [`crate::validate`]);
/// 2. on tokio's blocking pool: opens an [`IpvsClient`] inside `netns` ([`IpvsError::NoIpvs`]
///    on a kernel without IPVS — nothing else is done then), sets [`SYSCTLS`], and runs the
///    planner ([`apply_plan`]: only what differs from the kernel's table is changed);
/// 3. replaces the companion nft table ([`companion_script`], one transaction through
///    [`crate::Applier::global`]); the same transaction deletes the nft dataplane's table
///    `rs.table` if it is there (a node switched from the nft dataplane).
///
/// IPVS has no transactions: an error stops the run and what was done before it stays; the
/// planner compares with the kernel's table on every call, so the next call converges (the
/// agent retries on its next pass). Services come before the companion table, so a new
/// port-0 service exists before its packets are marked. Returns the IPVS operations done.
pub async fn sync(netns: &str, rs: &Ruleset, opts: &IpvsOptions) -> Result<Vec<Op>, IpvsError> {
    crate::validate(rs).map_err(|e| IpvsError::Invalid(e.to_string()))?;
    if rs.table == COMPANION_TABLE {
        return Err(IpvsError::Invalid(format!(
            "table name {COMPANION_TABLE:?} is the IPVS companion's"
        )));
    }
    let desired = desired_services(rs, opts)?;
    let ns = netns.to_string();
    let ops = tokio::task::spawn_blocking(move || {
        let mut c = IpvsClient::open_in(&ns)?;
        set_sysctls(&ns)?;
        apply_plan(&mut c, &desired)
    })
    .await
    .map_err(|e| IpvsError::Io {
        what: "blocking task",
        source: std::io::Error::other(e.to_string()),
    })??;
    let t = &rs.table;
    let script = format!(
        "table ip {t} {{}}\ndelete table ip {t}\n{}",
        companion_script(rs)
    );
    crate::Applier::global()
        .run_crate_script(netns, script, false)
        .await
        .map_err(IpvsError::Companion)?;
    Ok(ops)
}

/// Checks the companion table of `rs` in nft's check mode (`nft -c`) inside `netns`: parsed
/// and validated by the kernel, nothing changed. Needs nf_tables, not IPVS.
pub async fn check_companion(netns: &str, rs: &Ruleset) -> Result<(), IpvsError> {
    crate::Applier::global()
        .run_crate_script(netns, companion_script(rs), true)
        .await
        .map_err(IpvsError::Companion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let e = |n| IpvsError::from_errno("add service", "tcp 10.0.0.1:80".into(), n);
        assert!(matches!(e(libc::EEXIST), IpvsError::Exists { .. }));
        assert!(matches!(
            e(libc::ESRCH),
            IpvsError::NotFound {
                errno: libc::ESRCH,
                ..
            }
        ));
        assert!(matches!(
            e(libc::ENOENT),
            IpvsError::NotFound {
                errno: libc::ENOENT,
                ..
            }
        ));
        assert_eq!(
            e(libc::ESRCH).to_string(),
            "IPVS add service tcp 10.0.0.1:80: no such service"
        );
        match e(libc::EINVAL) {
            IpvsError::Kernel { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL))
            }
            other => panic!("{other:?}"),
        }
        // ENOENT on NEW/SET_SERVICE: the scheduler is missing.
        let s = Service::new(
            ServiceKey::tcp(Ipv4Addr::new(10, 0, 0, 1), 80),
            Scheduler::Mh,
        );
        match scheduler_error(Err(e(libc::ENOENT)), &s) {
            Err(IpvsError::UnknownScheduler { scheduler, .. }) => assert_eq!(scheduler, "mh"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            scheduler_error(Err(e(libc::ESRCH)), &s),
            Err(IpvsError::NotFound { .. })
        ));
        let no = IpvsError::NoIpvs { netns: "n1".into() };
        assert!(no.to_string().contains("this kernel has no IPVS"));
    }

    #[test]
    fn keys_display_and_schedulers() {
        assert_eq!(
            ServiceKey::udp(Ipv4Addr::new(10, 0, 0, 1), 53).to_string(),
            "udp 10.0.0.1:53"
        );
        let v6 = ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: "fd00::1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(v6.to_string(), "tcp [fd00::1]:80");
        assert!(v6.is_ipv6());
        assert_eq!(Service::new(v6, Scheduler::Rr).netmask, 128);
        for s in ["rr", "wrr", "sh", "mh", "wlc"] {
            assert_eq!(Scheduler::from_name(s).name(), s);
        }
        assert_eq!(Scheduler::from_name("wlc"), Scheduler::Other("wlc".into()));
    }
}
