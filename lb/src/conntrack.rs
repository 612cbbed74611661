//! Conntrack cleanup over ctnetlink: list a network namespace's IPv4 TCP/UDP conntrack entries
//! and delete those matching a [`CtFilter`].
//!
//! Why: UDP has no end of connection. When a backend of a UDP service is removed, the nft DNAT
//! rule changes but conntrack keeps translating an existing flow (same client address and
//! port) to the old backend, and every new packet renews the entry's timeout, so a client that
//! keeps sending (a resolver on a fixed port, a game, ...) never moves (moby#36878;
//! kube-proxy deletes such entries too). After removing or draining backend B of UDP service
//! VIP:port, delete the entries whose original destination is VIP:port and whose reply comes
//! from B ([`delete_matching`]); the client's next packet is a new flow and is balanced again.
//! TCP needs no cleanup: a dead backend resets or times out the connection.
//!
//! No crate in our dependency set speaks ctnetlink (rtnetlink / netlink-packet-route cover
//! routing only), so this is a small hand-written client from linux/netfilter/nfnetlink.h and
//! linux/netfilter/nfnetlink_conntrack.h, on the netlink socket and attribute code shared with
//! the IPVS client (`src/netlink.rs`). Messages go over `NETLINK_NETFILTER` with
//! `nlmsg_type = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_*` and a `nfgenmsg` header
//! (family `AF_INET`, version `NFNETLINK_V0`, res_id 0). The message builders and the parser
//! are pure and unit-tested byte for byte.
//!
//! A delete always names one entry by its original tuple (a CT_DELETE without a tuple would
//! flush the whole table) plus its `CTA_ID`, so an entry that was replaced by a new flow with
//! the same tuple since the dump is not deleted. An entry already gone (ENOENT: expired, or
//! deleted by someone else) is not an error.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;

use crate::Protocol;
use crate::netlink::{self, DecodeError, Msg, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NlSocket};

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;

// linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types
const IPCTNL_MSG_CT_NEW: u8 = 0;
const IPCTNL_MSG_CT_GET: u8 = 1;
const IPCTNL_MSG_CT_DELETE: u8 = 2;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
/// `IPS_SEEN_REPLY` in `CTA_STATUS`.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const AF_INET: u8 = libc::AF_INET as u8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// One direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtTuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl fmt::Display for CtTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{}",
            self.src, self.sport, self.dst, self.dport
        )
    }
}

/// An IPv4 TCP or UDP conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtEntry {
    pub protocol: Protocol,
    /// The flow as its first packet had it: client -> VIP:port.
    pub orig: CtTuple,
    /// The flow as replies have it: for a DNATed flow, backend:target_port -> client.
    pub reply: CtTuple,
    /// The kernel's id of the entry (`CTA_ID`); a delete carries it.
    pub id: Option<u32>,
    /// Conntrack zone (`CTA_ZONE`), 0 for the default zone.
    pub zone: u16,
    /// A reply has been seen (`IPS_SEEN_REPLY`): the flow reached its target.
    pub replied: bool,
}

impl fmt::Display for CtEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (reply {})", self.protocol, self.orig, self.reply)
    }
}

/// Which entries [`delete_matching`] deletes: `protocol` and original destination address
/// always, original destination port and reply source (the backend a DNATed flow went to)
/// when given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtFilter {
    pub protocol: Protocol,
    pub orig_dst: Ipv4Addr,
    pub orig_dport: Option<u16>,
    pub reply_src: Option<Ipv4Addr>,
    /// Only flows that never saw a reply (a TCP SYN to a backend that has gone).
    pub unreplied_only: bool,
}

impl CtFilter {
    /// The flows of service `protocol vip:port` that were sent to `backend`.
    pub fn backend(protocol: Protocol, vip: Ipv4Addr, port: u16, backend: Ipv4Addr) -> CtFilter {
        CtFilter {
            protocol,
            orig_dst: vip,
            orig_dport: Some(port),
            reply_src: Some(backend),
            unreplied_only: false,
        }
    }

    pub fn matches(&self, e: &CtEntry) -> bool {
        e.protocol == self.protocol
            && e.orig.dst == self.orig_dst
            && self.orig_dport.is_none_or(|p| e.orig.dport == p)
            && self.reply_src.is_none_or(|a| e.reply.src == a)
            && !(self.unreplied_only && e.replied)
    }
}

/// Errors of the conntrack client. The kernel's errno is always kept.
#[derive(Debug, thiserror::Error)]
pub enum CtError {
    /// The kernel refused a request: EPERM without CAP_NET_ADMIN, EINVAL or EOPNOTSUPP from a
    /// kernel without ctnetlink (`nf_conntrack_netlink`), ...
    #[error("conntrack {op} in network namespace {netns}: {source}")]
    Kernel {
        op: String,
        netns: String,
        #[source]
        source: io::Error,
    },
    /// The netlink socket itself failed (EPROTONOSUPPORT from `socket`: no nfnetlink).
    #[error("conntrack netlink socket in network namespace {netns} ({what}): {source}")]
    Io {
        netns: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A reply that does not parse.
    #[error("conntrack: malformed netlink reply: {0}")]
    Decode(String),
    #[error(transparent)]
    Netns(#[from] shoal_netns::Error),
}

impl From<DecodeError> for CtError {
    fn from(e: DecodeError) -> CtError {
        CtError::Decode(e.0)
    }
}

/// A ctnetlink socket in one network namespace. Blocking; not shared between threads.
pub struct CtClient {
    sock: NlSocket,
    seq: u32,
    /// For error messages: the namespace name, or `(current)`.
    netns: String,
}

impl CtClient {
    /// Opens a client for the network namespace `netns` (a name under /run/netns or a path
    /// such as `/proc/self/ns/net`): the socket is created on a thread inside it and stays
    /// there.
    pub fn open_in(netns: &str) -> Result<CtClient, CtError> {
        let sock = shoal_netns::run_in(netns, || NlSocket::open(libc::NETLINK_NETFILTER))?;
        CtClient::with_socket(sock, netns)
    }

    /// Opens a client in the calling thread's network namespace.
    pub fn open() -> Result<CtClient, CtError> {
        CtClient::with_socket(NlSocket::open(libc::NETLINK_NETFILTER), "(current)")
    }

    fn with_socket(
        sock: Result<NlSocket, netlink::SocketError>,
        netns: &str,
    ) -> Result<CtClient, CtError> {
        let sock = sock.map_err(|e| CtError::Io {
            netns: netns.to_string(),
            what: e.what,
            source: e.source,
        })?;
        Ok(CtClient {
            sock,
            seq: 0,
            netns: netns.to_string(),
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn req_error(&self, op: String, e: netlink::ReqError<CtError>) -> CtError {
        match e {
            netlink::ReqError::Errno(errno) => CtError::Kernel {
                op,
                netns: self.netns.clone(),
                source: io::Error::from_raw_os_error(errno),
            },
            netlink::ReqError::Io(what, source) => CtError::Io {
                netns: self.netns.clone(),
                what,
                source,
            },
            netlink::ReqError::Other(e) => e,
        }
    }

    /// Every IPv4 TCP and UDP entry (one IPCTNL_MSG_CT_GET dump). Entries of other protocols
    /// (ICMP, SCTP, ...) are skipped. A dump is not atomic: entries created or deleted while it
    /// runs may be missing.
    pub fn list(&mut self) -> Result<Vec<CtEntry>, CtError> {
        self.list_where(|_| true)
    }

    /// The entries of one dump that `keep` accepts, judged as they arrive: a table of tens
    /// of thousands of entries (TIME_WAIT under load) is never held in memory at once.
    pub fn list_where(
        &mut self,
        mut keep: impl FnMut(&CtEntry) -> bool,
    ) -> Result<Vec<CtEntry>, CtError> {
        let seq = self.next_seq();
        let req = dump_request(seq);
        let mut out = vec![];
        self.sock
            .request(&req, seq, |m| {
                if m.ty == msg_type(IPCTNL_MSG_CT_NEW)
                    && let Some(e) = parse_entry(m.payload)?
                    && keep(&e)
                {
                    out.push(e);
                }
                Ok(())
            })
            .map_err(|e| self.req_error("list (IPv4 dump)".into(), e))?;
        Ok(out)
    }

    /// Deletes one entry by its original tuple, zone and id. `Ok(false)`: it was already gone.
    pub fn delete(&mut self, e: &CtEntry) -> Result<bool, CtError> {
        let seq = self.next_seq();
        let req = delete_request(seq, e);
        match self.sock.request(&req, seq, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(netlink::ReqError::Errno(libc::ENOENT)) => Ok(false),
            Err(err) => Err(self.req_error(format!("delete {e}"), err)),
        }
    }

    /// Lists (one dump), then deletes every entry `pick` accepts; returns how many this call
    /// deleted (entries already gone are not counted).
    pub fn delete_where(&mut self, pick: impl FnMut(&CtEntry) -> bool) -> Result<usize, CtError> {
        let mut deleted = 0;
        for e in self.list_where(pick)? {
            if self.delete(&e)? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes every entry `f` matches; returns how many this call deleted.
    pub fn delete_matching(&mut self, f: &CtFilter) -> Result<usize, CtError> {
        let deleted = self.delete_where(|e| f.matches(e))?;
        tracing::debug!(
            netns = %self.netns,
            filter = ?f,
            deleted,
            "deleted conntrack entries"
        );
        Ok(deleted)
    }
}

fn open(netns: Option<&str>) -> Result<CtClient, CtError> {
    match netns {
        Some(ns) => CtClient::open_in(ns),
        None => CtClient::open(),
    }
}

/// The IPv4 TCP and UDP entries of namespace `netns` (`None`: the calling thread's).
pub fn list(netns: Option<&str>) -> Result<Vec<CtEntry>, CtError> {
    open(netns)?.list()
}

/// Whether `e` is a NATed flow whose target (the reply's source) is in `targets`.
pub fn nated_to(e: &CtEntry, targets: &std::collections::BTreeSet<Ipv4Addr>) -> bool {
    targets.contains(&e.reply.src) && e.reply.src != e.orig.dst
}

/// Deletes every NATed flow of namespace `netns` whose target is in `targets`, TCP and UDP,
/// answered or not: for targets that can no longer answer (their node is down). A client
/// that reuses the source port of such a flow would otherwise be sent to the dead target
/// again (conntrack ignores a SYN that matches an established entry). Returns how many were
/// deleted.
pub fn delete_nated_to(
    netns: &str,
    targets: &std::collections::BTreeSet<Ipv4Addr>,
) -> Result<usize, CtError> {
    if targets.is_empty() {
        return Ok(0);
    }
    CtClient::open_in(netns)?.delete_where(|e| nated_to(e, targets))
}

/// Deletes the entries of namespace `netns` (`None`: the calling thread's) that `f` matches;
/// returns how many were deleted. Entries that vanish between the dump and their delete are
/// not counted and not an error.
pub fn delete_matching(netns: Option<&str>, f: &CtFilter) -> Result<usize, CtError> {
    open(netns)?.delete_matching(f)
}

// ---- wire format (pure) ----

fn msg_type(msg: u8) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | u16::from(msg)
}

/// `struct nfgenmsg` for IPv4: family, version, res_id (big endian) 0.
const NFGENMSG_INET: [u8; 4] = [AF_INET, NFNETLINK_V0, 0, 0];

/// IPCTNL_MSG_CT_GET dump of the IPv4 table (the kernel filters by the nfgenmsg family).
fn dump_request(seq: u32) -> Vec<u8> {
    Msg::new(
        msg_type(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFGENMSG_INET,
    )
    .finish()
}

fn proto_num(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

fn put_tuple(m: &mut Msg, ty: u16, protocol: Protocol, t: &CtTuple) {
    m.begin_nest(ty);
    m.begin_nest(CTA_TUPLE_IP)
        .attr(CTA_IP_V4_SRC, &t.src.octets())
        .attr(CTA_IP_V4_DST, &t.dst.octets())
        .end_nest();
    m.begin_nest(CTA_TUPLE_PROTO)
        .u8(CTA_PROTO_NUM, proto_num(protocol))
        .attr(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes())
        .attr(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes())
        .end_nest();
    m.end_nest();
}

/// IPCTNL_MSG_CT_DELETE of one entry: its original tuple, `CTA_ID` when known, `CTA_ZONE`
/// when not the default zone.
fn delete_request(seq: u32, e: &CtEntry) -> Vec<u8> {
    let mut m = Msg::new(
        msg_type(IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFGENMSG_INET,
    );
    put_tuple(&mut m, CTA_TUPLE_ORIG, e.protocol, &e.orig);
    if let Some(id) = e.id {
        m.attr(CTA_ID, &id.to_be_bytes());
    }
    if e.zone != 0 {
        m.attr(CTA_ZONE, &e.zone.to_be_bytes());
    }
    m.finish()
}

fn be16(v: &[u8], what: &str) -> Result<u16, DecodeError> {
    v.get(0..2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| DecodeError(format!("{what}: short u16")))
}

fn be32(v: &[u8], what: &str) -> Result<u32, DecodeError> {
    v.get(0..4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| DecodeError(format!("{what}: short u32")))
}

fn v4(v: &[u8], what: &str) -> Result<Ipv4Addr, DecodeError> {
    v.get(0..4)
        .map(|s| Ipv4Addr::new(s[0], s[1], s[2], s[3]))
        .ok_or_else(|| DecodeError(format!("{what}: short IPv4 address")))
}

/// A tuple nest: `(protocol number, tuple)`.
fn parse_tuple(nest: &[u8], what: &str) -> Result<(u8, CtTuple), DecodeError> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let (mut sport, mut dport) = (0, 0);
    for (ty, v) in netlink::attrs(nest)? {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v) in netlink::attrs(v)? {
                    match ty {
                        CTA_IP_V4_SRC => src = Some(v4(v, what)?),
                        CTA_IP_V4_DST => dst = Some(v4(v, what)?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v) in netlink::attrs(v)? {
                    match ty {
                        CTA_PROTO_NUM => proto = v.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = be16(v, what)?,
                        CTA_PROTO_DST_PORT => dport = be16(v, what)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = |a: &str| DecodeError(format!("{what} without {a}"));
    Ok((
        proto.ok_or_else(|| missing("CTA_PROTO_NUM"))?,
        CtTuple {
            src: src.ok_or_else(|| missing("CTA_IP_V4_SRC"))?,
            dst: dst.ok_or_else(|| missing("CTA_IP_V4_DST"))?,
            sport,
            dport,
        },
    ))
}

/// An entry of a CT_GET dump (nfgenmsg + attributes). `Ok(None)` for an entry we do not
/// represent (not IPv4, not TCP/UDP).
fn parse_entry(payload: &[u8]) -> Result<Option<CtEntry>, DecodeError> {
    if payload.len() < 4 {
        return Err(DecodeError(
            "ctnetlink message shorter than nfgenmsg".into(),
        ));
    }
    let (nfgenmsg, body) = payload.split_at(4);
    if nfgenmsg[0] != AF_INET {
        return Ok(None);
    }
    let (mut orig, mut reply, mut id, mut zone, mut status) = (None, None, None, 0, 0);
    for (ty, v) in netlink::attrs(body)? {
        match ty {
            CTA_TUPLE_ORIG => orig = Some(v),
            CTA_TUPLE_REPLY => reply = Some(v),
            CTA_ID => id = Some(be32(v, "CTA_ID")?),
            CTA_ZONE => zone = be16(v, "CTA_ZONE")?,
            CTA_STATUS => status = be32(v, "CTA_STATUS")?,
            _ => {}
        }
    }
    let orig = orig.ok_or_else(|| DecodeError("entry without CTA_TUPLE_ORIG".into()))?;
    let reply = reply.ok_or_else(|| DecodeError("entry without CTA_TUPLE_REPLY".into()))?;
    let (num, orig) = parse_tuple(orig, "CTA_TUPLE_ORIG")?;
    let protocol = match num {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return Ok(None),
    };
    let (_, reply) = parse_tuple(reply, "CTA_TUPLE_REPLY")?;
    Ok(Some(CtEntry {
        protocol,
        orig,
        reply,
        id,
        zone,
        replied: status & IPS_SEEN_REPLY != 0,
    }))
}

/// Byte layouts computed by hand from linux/netlink.h, linux/netfilter/nfnetlink.h and
/// nfnetlink_conntrack.h (x86-64: netlink headers and attribute headers in host order = little
/// endian; addresses, ports, CTA_ID and CTA_ZONE in network order).
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);

    /// udp 10.200.0.2:40001 -> 10.96.0.10:53, DNATed to 10.200.1.2:8080.
    fn entry() -> CtEntry {
        CtEntry {
            protocol: Protocol::Udp,
            orig: CtTuple {
                src: CLIENT,
                dst: VIP,
                sport: 40001,
                dport: 53,
            },
            reply: CtTuple {
                src: BACKEND,
                dst: CLIENT,
                sport: 8080,
                dport: 40001,
            },
            id: Some(0x0102_0304),
            zone: 0,
            replied: true,
        }
    }

    /// CTA_TUPLE_ORIG of [`entry`], as we send it (NLA_F_NESTED set).
    const ORIG: [u8; 52] = [
        52, 0, 1, 0x80, // CTA_TUPLE_ORIG | NLA_F_NESTED
        20, 0, 1, 0x80, // CTA_TUPLE_IP | NLA_F_NESTED
        8, 0, 1, 0, 10, 200, 0, 2, // CTA_IP_V4_SRC
        8, 0, 2, 0, 10, 96, 0, 10, // CTA_IP_V4_DST
        28, 0, 2, 0x80, // CTA_TUPLE_PROTO | NLA_F_NESTED
        5, 0, 1, 0, 17, 0, 0, 0, // CTA_PROTO_NUM IPPROTO_UDP, pad
        6, 0, 2, 0, 0x9c, 0x41, 0, 0, // CTA_PROTO_SRC_PORT 40001 = 0x9c41, pad
        6, 0, 3, 0, 0, 53, 0, 0, // CTA_PROTO_DST_PORT 53
    ];

    /// CTA_TUPLE_REPLY of [`entry`] as the kernel dumps it.
    const REPLY: [u8; 52] = [
        52, 0, 2, 0x80, // CTA_TUPLE_REPLY | NLA_F_NESTED
        20, 0, 1, 0x80, //
        8, 0, 1, 0, 10, 200, 1, 2, // src: the backend
        8, 0, 2, 0, 10, 200, 0, 2, // dst: the client
        28, 0, 2, 0x80, //
        5, 0, 1, 0, 17, 0, 0, 0, //
        6, 0, 2, 0, 0x1f, 0x90, 0, 0, // 8080 = 0x1f90
        6, 0, 3, 0, 0x9c, 0x41, 0, 0, //
    ];

    fn hdr(len: u32, ty: [u8; 2], flags: u16, seq: u32) -> Vec<u8> {
        let mut v = vec![];
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&ty);
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0, 0]); // pid
        v.extend_from_slice(&[2, 0, 0, 0]); // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
        v
    }

    #[test]
    fn constants_match_the_kernel_headers() {
        // nlmsg_type = subsystem << 8 | message.
        assert_eq!(msg_type(IPCTNL_MSG_CT_NEW), 0x100);
        assert_eq!(msg_type(IPCTNL_MSG_CT_GET), 0x101);
        assert_eq!(msg_type(IPCTNL_MSG_CT_DELETE), 0x102);
        assert_eq!(libc::NETLINK_NETFILTER, 12);
        assert_eq!(AF_INET, 2);
    }

    #[test]
    fn dump_request_bytes() {
        // GET, REQUEST | DUMP (0x301), no attributes.
        assert_eq!(dump_request(7), hdr(20, [1, 1], 0x301, 7));
    }

    #[test]
    fn delete_request_bytes() {
        let mut want = hdr(80, [2, 1], 5, 9); // CT_DELETE, REQUEST | ACK
        want.extend_from_slice(&ORIG);
        want.extend_from_slice(&[8, 0, 12, 0, 1, 2, 3, 4]); // CTA_ID, big endian
        assert_eq!(delete_request(9, &entry()), want);

        // Without an id, in zone 7: CTA_ZONE (big endian) instead of CTA_ID.
        let e = CtEntry {
            id: None,
            zone: 7,
            ..entry()
        };
        let mut want = hdr(80, [2, 1], 5, 10);
        want.extend_from_slice(&ORIG);
        want.extend_from_slice(&[6, 0, 18, 0, 0, 7, 0, 0]);
        assert_eq!(delete_request(10, &e), want);

        // TCP: only the protocol number changes.
        let e = CtEntry {
            protocol: Protocol::Tcp,
            ..entry()
        };
        let got = delete_request(11, &e);
        assert_eq!(&got[48..53], &[5, 0, 1, 0, 6]);
    }

    /// A dumped entry the way the kernel sends it: nfgenmsg, both tuples, then status,
    /// timeout, mark, use, id (all skipped but the id).
    fn dumped(orig: &[u8], reply: &[u8]) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0];
        p.extend_from_slice(orig);
        p.extend_from_slice(reply);
        p.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0, 0x8e]); // CTA_STATUS
        p.extend_from_slice(&[8, 0, 7, 0, 0, 0, 0, 30]); // CTA_TIMEOUT
        p.extend_from_slice(&[8, 0, 8, 0, 0, 0, 0, 0]); // CTA_MARK
        p.extend_from_slice(&[8, 0, 11, 0, 0, 0, 0, 1]); // CTA_USE
        p.extend_from_slice(&[8, 0, 12, 0, 1, 2, 3, 4]); // CTA_ID
        p
    }

    #[test]
    fn parse_dumped_entry() {
        let got = parse_entry(&dumped(&ORIG, &REPLY)).unwrap();
        assert_eq!(got, Some(entry()));
        // Nests without NLA_F_NESTED (older kernels) parse the same.
        let strip = |t: &[u8]| {
            let mut t = t.to_vec();
            for i in [3, 7, 27] {
                t[i] &= 0x7f;
            }
            t
        };
        let got = parse_entry(&dumped(&strip(&ORIG), &strip(&REPLY))).unwrap();
        assert_eq!(got, Some(entry()));
        // Zone.
        let mut p = dumped(&ORIG, &REPLY);
        p.extend_from_slice(&[6, 0, 18, 0, 0, 7, 0, 0]);
        assert_eq!(parse_entry(&p).unwrap().unwrap().zone, 7);
    }

    #[test]
    fn parse_skips_other_protocols_and_families() {
        // ICMP (1): skipped, not an error.
        let (mut o, mut r) = (ORIG, REPLY);
        o[32] = 1;
        r[32] = 1;
        assert_eq!(parse_entry(&dumped(&o, &r)).unwrap(), None);
        // AF_INET6 entries are skipped without looking further.
        assert_eq!(parse_entry(&[10, 0, 0, 0]).unwrap(), None);
    }

    #[test]
    fn parse_rejects_broken_entries() {
        assert!(parse_entry(&[2, 0]).is_err());
        // No reply tuple.
        let mut p = vec![2, 0, 0, 0];
        p.extend_from_slice(&ORIG);
        let e = parse_entry(&p).unwrap_err();
        assert!(e.0.contains("CTA_TUPLE_REPLY"), "{e}");
        // An attribute longer than the message.
        let mut p = dumped(&ORIG, &REPLY);
        p[4] = 200;
        assert!(parse_entry(&p).is_err());
        // A tuple without its destination address.
        let mut o = ORIG;
        o[18] = 9; // CTA_IP_V4_DST -> unknown type 9
        let e = parse_entry(&dumped(&o, &REPLY)).unwrap_err();
        assert!(e.0.contains("CTA_IP_V4_DST"), "{e}");
    }

    #[test]
    fn filter_matches() {
        let e = entry();
        let f = CtFilter::backend(Protocol::Udp, VIP, 53, BACKEND);
        assert!(f.matches(&e));
        let other_backend = CtFilter {
            reply_src: Some(Ipv4Addr::new(10, 200, 2, 2)),
            ..f
        };
        assert!(!other_backend.matches(&e));
        assert!(
            !CtFilter {
                orig_dport: Some(54),
                ..f
            }
            .matches(&e)
        );
        assert!(
            !CtFilter {
                protocol: Protocol::Tcp,
                ..f
            }
            .matches(&e)
        );
        assert!(
            !CtFilter {
                orig_dst: BACKEND,
                ..f
            }
            .matches(&e)
        );
        // Wildcards: every backend, every port of the VIP.
        let any = CtFilter {
            protocol: Protocol::Udp,
            orig_dst: VIP,
            orig_dport: None,
            reply_src: None,
            unreplied_only: false,
        };
        assert!(any.matches(&e));
        let unreplied = CtFilter {
            unreplied_only: true,
            ..any
        };
        assert_eq!(unreplied.matches(&e), !e.replied);
        let answered = CtEntry { replied: true, ..e };
        assert!(!unreplied.matches(&answered));
        assert!(unreplied.matches(&CtEntry {
            replied: false,
            ..e
        }));
    }

    #[test]
    fn nated_to_picks_translated_flows_to_lost_targets_only() {
        let lost: std::collections::BTreeSet<Ipv4Addr> = [BACKEND].into();
        let e = entry();
        assert!(nated_to(&e, &lost), "answered UDP flow to a lost backend");
        let tcp = CtEntry {
            protocol: Protocol::Tcp,
            ..e
        };
        assert!(
            nated_to(&tcp, &lost),
            "established TCP flow to a lost backend"
        );
        let elsewhere = CtEntry {
            reply: CtTuple {
                src: Ipv4Addr::new(10, 200, 2, 2),
                ..e.reply
            },
            ..e
        };
        assert!(!nated_to(&elsewhere, &lost), "flow to a live backend");
        // Straight to the address, no NAT: not ours to judge.
        let direct = CtEntry {
            orig: CtTuple {
                dst: BACKEND,
                ..e.orig
            },
            ..e
        };
        assert!(!nated_to(&direct, &lost));
        assert!(!nated_to(&e, &Default::default()));
    }

    #[test]
    fn display_and_errors() {
        assert_eq!(
            entry().to_string(),
            "udp 10.200.0.2:40001 -> 10.96.0.10:53 (reply 10.200.1.2:8080 -> 10.200.0.2:40001)"
        );
        let e = CtError::Kernel {
            op: format!("delete {}", entry()),
            netns: "n1".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("conntrack delete udp 10.200.0.2:40001 -> 10.96.0.10:53"),
            "{msg}"
        );
        assert!(
            msg.contains("in network namespace n1") && msg.contains("(os error 1)"),
            "{msg}"
        );
    }
}
