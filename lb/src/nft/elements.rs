//! Loading a [`Model`]'s map and set elements straight over nfnetlink: every element as
//! `NFT_MSG_NEWSETELEM` messages, all of them in ONE nfnetlink batch (one transaction).
//!
//! Why: nft parses and evaluates every element of a script in userspace, about 11 µs per
//! element, which is most of a first load (100,000 `backends_tcp` elements: 1.1 s of nft's
//! user time against about 0.5 s in the kernel). So the first load of a namespace that has no
//! table lets nft create only the structure ([`Model::render_structure`]: table, maps, sets,
//! chains, rules) and then adds the elements here. The elements are plain bytes whose layout
//! is fixed by the map declarations, so encoding them costs next to nothing.
//!
//! Hand-written: no crate in our dependency set writes nf_tables set elements (the netlink
//! crates we have cover routing; the nftnl bindings need libnftnl). It follows
//! linux/netfilter/nf_tables.h and linux/netfilter/nfnetlink.h, on the netlink message and
//! socket code shared with the conntrack and IPVS clients (`src/netlink.rs`), and was checked
//! byte for byte against `nft --debug=netlink,mnl -f` of rendered tables (see the unit tests).
//!
//! Wire format:
//! - one datagram: `NFNL_MSG_BATCH_BEGIN`, the element messages, `NFNL_MSG_BATCH_END`; the
//!   batch messages' `nfgenmsg` has family `AF_UNSPEC`, version `NFNETLINK_V0` and res_id
//!   `NFNL_SUBSYS_NFTABLES` (big endian). nfnetlink applies the batch as one transaction: all
//!   elements or none.
//! - element messages: `nlmsg_type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM`, flags
//!   `NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK`, `nfgenmsg` family `NFPROTO_IPV4`; attributes
//!   `NFTA_SET_ELEM_LIST_TABLE`, `NFTA_SET_ELEM_LIST_SET` (by name: the sets exist already) and
//!   the nest `NFTA_SET_ELEM_LIST_ELEMENTS` of `NFTA_LIST_ELEM` nests, each with
//!   `NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }` and, for maps, `NFTA_SET_ELEM_DATA {
//!   NFTA_DATA_VALUE }` or `{ NFTA_DATA_VERDICT { NFTA_VERDICT_CODE (be32), NFTA_VERDICT_CHAIN
//!   } }`. A message holds at most [`MAX_MSG`] bytes: the elements nest's length is a u16.
//! - key and data bytes: the fields of a concatenation one after the other, each padded to 4
//!   bytes; addresses and ports in network order, the protocol as one byte, and the slot
//!   number (`numgen` / `jhash` results) as a u32 in host order, as those expressions write
//!   their register.
//!
//! Every element message asks for an ACK; the kernel answers them all after the commit (or
//! the abort), each with its sequence number, so an error names the map it belongs to.

use std::io;
use std::net::Ipv4Addr;

use crate::model::{Dispatch, Model};
use crate::netlink::{
    self, Msg, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NlSocket, SocketError, align4,
};
use crate::{LbError, Protocol};

// linux/netlink.h
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_MIN_TYPE: u16 = 0x10;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
// asm-generic/socket.h
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

// linux/netfilter/nfnetlink.h
const NFNL_MSG_BATCH_BEGIN: u16 = NLMSG_MIN_TYPE;
const NFNL_MSG_BATCH_END: u16 = NLMSG_MIN_TYPE + 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;

// linux/netfilter.h
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_IPV4: u8 = 2;
const NF_ACCEPT: i32 = 1;

// linux/netfilter/nf_tables.h
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
// enum nft_verdict_attributes
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
// enum nft_verdicts
const NFT_GOTO: i32 = -4;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Largest element message: the `NFTA_SET_ELEM_LIST_ELEMENTS` nest inside it has a 16-bit
/// length, so a message must stay below 64 KiB.
pub(crate) const MAX_MSG: usize = 60 * 1024;

/// Key or data bytes of one element: at most three 4-byte fields.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Bytes {
    b: [u8; 12],
    len: u8,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for w in self.as_slice().chunks(4) {
            for b in w {
                write!(f, "{b:02x}")?;
            }
            f.write_str(" ")?;
        }
        Ok(())
    }
}

impl Bytes {
    fn new() -> Bytes {
        Bytes { b: [0; 12], len: 0 }
    }

    /// A field of `v`, zero-padded to 4 bytes.
    fn field(mut self, v: &[u8]) -> Bytes {
        let at = self.len as usize;
        self.b[at..at + v.len()].copy_from_slice(v);
        self.len = (at + align4(v.len())) as u8;
        self
    }

    fn addr(self, a: Ipv4Addr) -> Bytes {
        self.field(&a.octets())
    }

    fn proto(self, p: Protocol) -> Bytes {
        self.field(&[match p {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }])
    }

    fn port(self, p: u16) -> Bytes {
        self.field(&p.to_be_bytes())
    }

    /// `numgen` and `jhash` store their result in host byte order.
    fn slot(self, s: u32) -> Bytes {
        self.field(&s.to_ne_bytes())
    }

    /// A port as the whole data of a map (`: tcp dport`): 2 bytes, not padded.
    fn bare_port(p: u16) -> Bytes {
        let mut b = Bytes::new();
        b.b[..2].copy_from_slice(&p.to_be_bytes());
        b.len = 2;
        b
    }

    fn as_slice(&self) -> &[u8] {
        &self.b[..self.len as usize]
    }
}

/// What an element maps its key to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Data<'a> {
    /// A set element.
    None,
    Value(Bytes),
    /// A verdict map's verdict: `NF_ACCEPT`, or `NFT_GOTO` with its chain.
    Verdict {
        code: i32,
        chain: Option<&'a str>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Elem<'a> {
    key: Bytes,
    data: Data<'a>,
}

impl Elem<'_> {
    /// Bytes [`put_elem`] writes for it.
    fn encoded_len(&self) -> usize {
        let value = |n: usize| 4 + align4(n);
        let data = match self.data {
            Data::None => 0,
            Data::Value(v) => 4 + value(v.len as usize),
            Data::Verdict { chain, .. } => {
                4 + 4 + value(4) + chain.map_or(0, |c| value(c.len() + 1))
            }
        };
        4 + 4 + value(self.key.len as usize) + data
    }
}

fn verdict(d: &Dispatch) -> Data<'_> {
    match d {
        Dispatch::NoBackends => Data::Verdict {
            code: NF_ACCEPT,
            chain: None,
        },
        Dispatch::Chain(c) => goto(c),
    }
}

fn goto(chain: &str) -> Data<'_> {
    Data::Verdict {
        code: NFT_GOTO,
        chain: Some(chain),
    }
}

/// Every element of the model, per map and set, in the order of the model's declarations
/// (the same elements [`Model::render`] writes).
fn map_elements(m: &Model) -> Vec<(&'static str, Vec<Elem<'_>>)> {
    let b = Bytes::new;
    let set = |key| Elem {
        key,
        data: Data::None,
    };
    let port_backends = |proto: Protocol| {
        m.backends
            .iter()
            .filter(|((_, p, _, _), _)| *p == proto)
            .map(|((v, _, port, s), (be, tp))| Elem {
                key: b().addr(*v).port(*port).slot(*s),
                data: Data::Value(b().addr(*be).port(*tp)),
            })
            .collect()
    };
    let target_ports = |proto: Protocol| {
        m.target_ports
            .iter()
            .filter(|((_, p, _), _)| *p == proto)
            .map(|((v, _, port), tp)| Elem {
                key: b().addr(*v).port(*port),
                data: Data::Value(Bytes::bare_port(*tp)),
            })
            .collect()
    };
    vec![
        ("vips", m.vips.iter().map(|v| set(b().addr(*v))).collect()),
        (
            "hairpin",
            m.hairpin
                .iter()
                .map(|e| set(b().addr(*e).addr(*e)))
                .collect(),
        ),
        (
            "services",
            m.services
                .iter()
                .map(|((v, p, port), d)| Elem {
                    key: b().addr(*v).proto(*p).port(*port),
                    data: verdict(d),
                })
                .collect(),
        ),
        (
            "any_port",
            m.any_port
                .iter()
                .map(|((v, p), d)| Elem {
                    key: b().addr(*v).proto(*p),
                    data: verdict(d),
                })
                .collect(),
        ),
        ("backends_tcp", port_backends(Protocol::Tcp)),
        ("backends_udp", port_backends(Protocol::Udp)),
        (
            "any_backends",
            m.any_backends
                .iter()
                .map(|((v, p, s), be)| Elem {
                    key: b().addr(*v).proto(*p).slot(*s),
                    data: Data::Value(b().addr(*be)),
                })
                .collect(),
        ),
        ("target_ports_tcp", target_ports(Protocol::Tcp)),
        ("target_ports_udp", target_ports(Protocol::Udp)),
        (
            "affinity_services",
            m.affinity_services
                .iter()
                .map(|((v, p), c)| Elem {
                    key: b().addr(*v).proto(*p),
                    data: goto(c),
                })
                .collect(),
        ),
    ]
}

fn put_elem(msg: &mut Msg, e: &Elem<'_>) {
    msg.begin_nest(NFTA_LIST_ELEM);
    msg.begin_nest(NFTA_SET_ELEM_KEY)
        .attr(NFTA_DATA_VALUE, e.key.as_slice())
        .end_nest();
    match e.data {
        Data::None => {}
        Data::Value(v) => {
            msg.begin_nest(NFTA_SET_ELEM_DATA)
                .attr(NFTA_DATA_VALUE, v.as_slice())
                .end_nest();
        }
        Data::Verdict { code, chain } => {
            msg.begin_nest(NFTA_SET_ELEM_DATA)
                .begin_nest(NFTA_DATA_VERDICT)
                .attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                msg.str(NFTA_VERDICT_CHAIN, c);
            }
            msg.end_nest().end_nest();
        }
    }
    msg.end_nest();
}

/// The `nfgenmsg` of the batch delimiters: res_id is the subsystem, in network order.
fn batch_msg(ty: u16, seq: u32) -> Vec<u8> {
    let res = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    Msg::new(
        ty,
        NLM_F_REQUEST,
        seq,
        [NFPROTO_UNSPEC, NFNETLINK_V0, res[0], res[1]],
    )
    .finish()
}

fn elem_msg_of(ty: u16, table: &str, map: &str, seq: u32) -> Msg {
    let flags = if ty == NFT_MSG_NEWSETELEM {
        NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK
    } else {
        NLM_F_REQUEST | NLM_F_ACK
    };
    let mut m = Msg::new(
        NFNL_SUBSYS_NFTABLES << 8 | ty,
        flags,
        seq,
        [NFPROTO_IPV4, NFNETLINK_V0, 0, 0],
    );
    m.str(NFTA_SET_ELEM_LIST_TABLE, table)
        .str(NFTA_SET_ELEM_LIST_SET, map)
        .begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    m
}

/// A model's elements encoded as one nfnetlink batch.
pub(crate) struct Batch {
    pub(crate) table: String,
    /// The whole datagram: batch begin, element messages, batch end.
    pub(crate) bytes: Vec<u8>,
    /// Sequence number of the batch begin; the element messages follow it, then the end.
    first_seq: u32,
    /// The map of each element message, in order (message i has sequence first_seq + 1 + i).
    pub(crate) msgs: Vec<&'static str>,
    pub(crate) elements: usize,
}

impl Batch {
    fn map_of(&self, seq: u32) -> Option<&'static str> {
        let i = seq.checked_sub(self.first_seq)?.checked_sub(1)?;
        self.msgs.get(i as usize).copied()
    }
}

/// Closes the elements nest of `msg` and appends it to the batch.
fn flush(mut msg: Msg, map: &'static str, bytes: &mut Vec<u8>, msgs: &mut Vec<&'static str>) {
    msg.end_nest();
    bytes.extend_from_slice(&msg.finish());
    msgs.push(map);
}

/// One map's elements.
type MapElems<'a> = (&'static str, Vec<Elem<'a>>);

/// Encodes every element of `m` as `NFT_MSG_NEWSETELEM` messages of at most [`MAX_MSG`]
/// bytes, framed by a batch begin and end. Pure.
pub(crate) fn encode(m: &Model, first_seq: u32) -> Batch {
    let adds: Vec<_> = map_elements(m)
        .into_iter()
        .filter(|(_, elems)| !elems.is_empty())
        .collect();
    frame(&m.table, first_seq, &[(NFT_MSG_NEWSETELEM, adds)])
}

/// The element changes that turn the maps of `old` into those of `new` (two partial or whole
/// models of one table), as one batch: first `NFT_MSG_DELSETELEM` of every element whose key
/// is gone or whose data changed (key only), then `NFT_MSG_NEWSETELEM` of every new or
/// changed element, the same order nft's own transaction has. None when nothing differs.
/// Pure.
pub(crate) fn encode_delta(old: &Model, new: &Model, first_seq: u32) -> Option<Batch> {
    let (a, b) = (map_elements(old), map_elements(new));
    let mut dels: Vec<MapElems<'_>> = vec![];
    let mut adds: Vec<MapElems<'_>> = vec![];
    for ((map, olds), (_, news)) in a.iter().zip(b.iter()) {
        let new_set: std::collections::HashSet<&Elem<'_>> = news.iter().collect();
        let old_set: std::collections::HashSet<&Elem<'_>> = olds.iter().collect();
        let gone: Vec<Elem<'_>> = olds
            .iter()
            .filter(|e| !new_set.contains(e))
            // A changed value is a delete of the key and an add; the delete needs the key only.
            .map(|e| Elem {
                key: e.key,
                data: Data::None,
            })
            .collect();
        let came: Vec<Elem<'_>> = news
            .iter()
            .filter(|e| !old_set.contains(e))
            .copied()
            .collect();
        if !gone.is_empty() {
            dels.push((map, gone));
        }
        if !came.is_empty() {
            adds.push((map, came));
        }
    }
    if dels.is_empty() && adds.is_empty() {
        return None;
    }
    Some(frame(
        &new.table,
        first_seq,
        &[(NFT_MSG_DELSETELEM, dels), (NFT_MSG_NEWSETELEM, adds)],
    ))
}

/// One batch: begin, then per (message type, map) messages of at most [`MAX_MSG`] bytes each,
/// then end.
fn frame(table: &str, first_seq: u32, parts: &[(u16, Vec<MapElems<'_>>)]) -> Batch {
    let mut bytes = batch_msg(NFNL_MSG_BATCH_BEGIN, first_seq);
    let mut msgs = vec![];
    let mut elements = 0;
    let mut seq = first_seq;
    for (ty, groups) in parts {
        for (map, elems) in groups {
            seq += 1;
            let mut msg = elem_msg_of(*ty, table, map, seq);
            let mut in_msg = 0;
            for e in elems {
                let len = e.encoded_len();
                if in_msg > 0 && msg.size() + len > MAX_MSG {
                    flush(msg, map, &mut bytes, &mut msgs);
                    seq += 1;
                    msg = elem_msg_of(*ty, table, map, seq);
                    in_msg = 0;
                }
                let before = msg.size();
                put_elem(&mut msg, e);
                debug_assert_eq!(msg.size() - before, len, "{e:?}");
                in_msg += 1;
            }
            elements += elems.len();
            flush(msg, map, &mut bytes, &mut msgs);
        }
    }
    bytes.extend_from_slice(&batch_msg(NFNL_MSG_BATCH_END, seq + 1));
    Batch {
        table: table.to_string(),
        bytes,
        first_seq,
        msgs,
        elements,
    }
}

/// A namespace's nfnetlink socket kept between element updates (see [`open_socket`]).
pub(crate) type SharedSocket = std::sync::Arc<std::sync::Mutex<Option<NlSocket>>>;

/// Applies the element changes from `old` to `new` (see [`encode_delta`]) in one nfnetlink
/// batch: one transaction, all or nothing. Returns the number of element operations. Uses
/// (and on first use opens) the socket in `sock`; drops it after an error.
pub(crate) async fn apply_delta(
    netns: &str,
    sock: &SharedSocket,
    old: &Model,
    new: &Model,
) -> Result<usize, LbError> {
    let Some(batch) = encode_delta(old, new, 1) else {
        return Ok(0);
    };
    let n = batch.elements;
    let (ns, sock) = (netns.to_string(), sock.clone());
    tokio::task::spawn_blocking(move || {
        let mut guard = sock.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(open_socket(&ns)?);
        }
        let res = send_on(&ns, guard.as_mut().expect("opened above"), &batch);
        if res.is_err() {
            *guard = None;
        }
        res
    })
    .await
    .map_err(|e| LbError::Library(format!("element update in {netns:?}: {e}")))??;
    Ok(n)
}

fn socket_error(netns: &str, e: SocketError) -> LbError {
    LbError::Elements {
        netns: netns.to_string(),
        map: None,
        what: format!("netlink socket ({})", e.what),
        source: e.source,
    }
}

/// Sends the batch to nf_tables in `netns` and waits for the kernel's answer to every
/// element message. Blocking. An error names the map of the first message the kernel
/// refused (the whole batch is then void: nothing was added).
pub(crate) fn send(netns: &str, batch: &Batch) -> Result<(), LbError> {
    if batch.msgs.is_empty() {
        return Ok(());
    }
    let mut sock = open_socket(netns)?;
    send_on(netns, &mut sock, batch)
}

/// A nfnetlink socket in `netns` for [`send_on`]. Keep it for later batches: closing a
/// nfnetlink socket after a transaction that deleted something waits for the kernel (8-25 ms
/// measured here), far longer than an element update takes.
pub(crate) fn open_socket(netns: &str) -> Result<NlSocket, LbError> {
    let sock = shoal_netns::run_in(netns, || NlSocket::open(libc::NETLINK_NETFILTER))?;
    let sock = sock.map_err(|e| socket_error(netns, e))?;
    // An error answer without the refused message (which may be 60 KiB) in it.
    sock.set_int_opt(
        SOL_NETLINK,
        NETLINK_CAP_ACK,
        1,
        "setsockopt NETLINK_CAP_ACK",
    )
    .map_err(|e| socket_error(netns, e))?;
    Ok(sock)
}

/// Sends the batch on `sock` (see [`send`]).
pub(crate) fn send_on(netns: &str, sock: &mut NlSocket, batch: &Batch) -> Result<(), LbError> {
    if batch.msgs.is_empty() {
        return Ok(());
    }
    // The batch must fit the send buffer in one piece (nft raises it the same way). FORCE
    // needs CAP_NET_ADMIN, which loading rules needs anyway; the plain option is capped by
    // net.core.wmem_max. The kernel doubles the value given.
    let want = i32::try_from(batch.bytes.len()).unwrap_or(i32::MAX / 2);
    if sock
        .set_int_opt(libc::SOL_SOCKET, SO_SNDBUFFORCE, want, "SO_SNDBUFFORCE")
        .is_err()
    {
        sock.set_int_opt(libc::SOL_SOCKET, libc::SO_SNDBUF, want, "SO_SNDBUF")
            .map_err(|e| socket_error(netns, e))?;
    }
    // Room for every acknowledgement (a few hundred bytes of socket memory each).
    let acks = i32::try_from(batch.msgs.len() * 2048 + 64 * 1024).unwrap_or(i32::MAX / 2);
    if sock
        .set_int_opt(libc::SOL_SOCKET, SO_RCVBUFFORCE, acks, "SO_RCVBUFFORCE")
        .is_err()
    {
        let _ = sock.set_int_opt(libc::SOL_SOCKET, libc::SO_RCVBUF, acks, "SO_RCVBUF");
    }
    sock.send_datagram(&batch.bytes)
        .map_err(|source| LbError::Elements {
            netns: netns.to_string(),
            map: None,
            what: format!(
                "sending the batch ({} bytes, {} messages)",
                batch.bytes.len(),
                batch.msgs.len()
            ),
            source,
        })?;
    collect_acks(netns, batch, sock)
}

/// Reads the kernel's answers: one per element message (`NLMSG_ERROR`, 0 for success), and
/// an error on the batch begin when the commit itself fails. nfnetlink processes the batch
/// within the send, so everything is queued by now; a blocking read only waits for what is
/// still missing while nothing has failed.
fn collect_acks(netns: &str, batch: &Batch, sock: &mut NlSocket) -> Result<(), LbError> {
    let mut acked = vec![false; batch.msgs.len()];
    let mut pending = acked.len();
    // (sequence number, errno) of the refusals, in arrival order.
    let mut errors: Vec<(u32, i32)> = vec![];
    let io_err = |what: String, source: io::Error| LbError::Elements {
        netns: netns.to_string(),
        map: None,
        what,
        source,
    };
    while pending > 0 || !errors.is_empty() {
        let wait = errors.is_empty();
        let dgram = match sock.recv_datagram(wait) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                return Err(io_err(
                    format!(
                        "waiting for the kernel's answers ({pending} of {} missing)",
                        batch.msgs.len()
                    ),
                    e,
                ));
            }
        };
        let msgs = netlink::split_msgs(dgram).map_err(|e| {
            io_err(
                "reading the kernel's answers".into(),
                io::Error::new(io::ErrorKind::InvalidData, e.0),
            )
        })?;
        for m in msgs {
            if m.ty != NLMSG_ERROR {
                continue;
            }
            let code = netlink::error_code(m.payload).map_err(|e| {
                io_err(
                    "reading the kernel's answers".into(),
                    io::Error::new(io::ErrorKind::InvalidData, e.0),
                )
            })?;
            if batch.map_of(m.seq).is_some() {
                let i = (m.seq - batch.first_seq - 1) as usize;
                if !acked[i] {
                    acked[i] = true;
                    pending -= 1;
                }
            }
            if code != 0 {
                errors.push((m.seq, code));
            }
        }
    }
    // The first refused element message names the map; otherwise a batch-level error (the
    // commit failed, or the batch was refused as a whole).
    let first = errors
        .iter()
        .find(|(seq, _)| batch.map_of(*seq).is_some())
        .or(errors.first());
    if let Some(&(seq, code)) = first {
        let map = batch.map_of(seq);
        let what = match map {
            Some(map) => {
                let hint = if code == libc::ENOENT {
                    " (no such table or map)"
                } else {
                    ""
                };
                format!(
                    "nf_tables refused the elements of map {map:?} in table ip {}{hint}; batch of {} elements in {} messages not applied",
                    batch.table,
                    batch.elements,
                    batch.msgs.len()
                )
            }
            None => format!(
                "nf_tables refused the batch of {} elements in {} messages (table ip {})",
                batch.elements,
                batch.msgs.len(),
                batch.table
            ),
        };
        return Err(LbError::Elements {
            netns: netns.to_string(),
            map: map.map(str::to_string),
            what,
            source: io::Error::from_raw_os_error(code),
        });
    }
    if pending > 0 {
        return Err(io_err(
            format!(
                "the kernel answered {} of {} element messages",
                batch.msgs.len() - pending,
                batch.msgs.len()
            ),
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok(())
}

/// What a load sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementLoad {
    pub elements: usize,
    pub messages: usize,
    pub bytes: usize,
}

/// Adds every element of `model` to the table `model.table` in `netns` in one nfnetlink
/// batch (one transaction: all or none). The table must have the layout's maps and sets
/// already, e.g. from [`Model::render_structure`], and none of the elements (or the same
/// ones). An error names the map the kernel refused, with its errno.
pub async fn load_elements(netns: &str, model: &Model) -> Result<ElementLoad, LbError> {
    let batch = encode(model, 1);
    let load = ElementLoad {
        elements: batch.elements,
        messages: batch.msgs.len(),
        bytes: batch.bytes.len(),
    };
    let ns = netns.to_string();
    tokio::task::spawn_blocking(move || send(&ns, &batch))
        .await
        .map_err(|e| LbError::Library(format!("element load in {netns:?}: {e}")))??;
    Ok(load)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ruleset, Selection, VirtualService};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn model() -> Model {
        let mut web = VirtualService {
            id: "web".into(),
            vip: ip("10.96.0.10"),
            port: 80,
            target_port: 8080,
            backends: vec![ip("10.0.1.1"), ip("10.0.1.2")],
            affinity: Some(600),
            ..Default::default()
        };
        web.draining = vec![];
        let all = VirtualService {
            id: "all".into(),
            vip: ip("10.96.0.10"),
            port: 0,
            target_port: 0,
            backends: vec![ip("10.0.1.1")],
            ..Default::default()
        };
        let dns = VirtualService {
            id: "dns".into(),
            vip: ip("10.96.0.20"),
            protocol: Protocol::Udp,
            port: 53,
            target_port: 53,
            selection: Selection::Consistent,
            backends: vec![ip("10.0.1.7")],
            ..Default::default()
        };
        Model::from_ruleset(&Ruleset {
            table: "shoal_lb".into(),
            vips: vec![ip("10.96.0.30")],
            services: vec![web, all, dns],
            local_endpoints: vec![ip("10.0.1.1")],
        })
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn maps_are_those_of_the_model_in_order() {
        let names: Vec<&str> = map_elements(&model()).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, crate::model::map_names());
    }

    /// Key and data layouts as `nft --debug=netlink` shows them for the rendered table.
    #[test]
    fn element_layouts() {
        let m = model();
        let els = map_elements(&m);
        let get = |map: &str| &els.iter().find(|(n, _)| *n == map).unwrap().1;
        assert_eq!(hex(get("vips")[0].key.as_slice()), "0a60000a");
        assert_eq!(hex(get("hairpin")[0].key.as_slice()), "0a0001010a000101");
        let svc = get("services")[0];
        assert_eq!(hex(svc.key.as_slice()), "0a60000a0600000000500000");
        assert_eq!(
            svc.data,
            Data::Verdict {
                code: NFT_GOTO,
                chain: Some("aff_rnd_tcp_2")
            }
        );
        let be = get("backends_tcp")[1];
        let slot1 = hex(&1u32.to_ne_bytes());
        assert_eq!(hex(be.key.as_slice()), format!("0a60000a00500000{slot1}"));
        assert_eq!(
            be.data,
            Data::Value(Bytes::new().addr(ip("10.0.1.2")).port(8080))
        );
        let Data::Value(v) = be.data else { panic!() };
        assert_eq!(hex(v.as_slice()), "0a0001021f900000");
        assert_eq!(get("backends_udp").len(), 256);
        let any = get("any_backends")[0];
        assert_eq!(
            hex(any.key.as_slice()),
            format!("0a60000a06000000{}", hex(&0u32.to_ne_bytes()))
        );
        let Data::Value(v) = any.data else { panic!() };
        assert_eq!(hex(v.as_slice()), "0a000101");
        let tp = get("target_ports_tcp")[0];
        assert_eq!(hex(tp.key.as_slice()), "0a60000a00500000");
        let Data::Value(v) = tp.data else { panic!() };
        assert_eq!(hex(v.as_slice()), "1f90");
        assert_eq!(
            get("affinity_services")[0].data,
            Data::Verdict {
                code: NFT_GOTO,
                chain: Some("rec_600")
            }
        );
    }

    /// The message nft 1.0.6 sends for `any_port`'s element (from `nft --debug=mnl`), less
    /// its set id attribute (nft names a set it creates in the same batch by id too).
    #[test]
    #[cfg(target_endian = "little")]
    fn element_message_matches_nft() {
        let mut m = elem_msg_of(NFT_MSG_NEWSETELEM, "shoal_lb", "any_port", 7);
        put_elem(
            &mut m,
            &Elem {
                key: Bytes::new().addr(ip("10.96.0.10")).proto(Protocol::Tcp),
                data: goto("aff_rnd_any_1"),
            },
        );
        m.end_nest();
        let b = m.finish();
        let want = concat!(
            "02000000", // nfgenmsg: NFPROTO_IPV4, v0, res_id 0
            "0d000100", "73686f61", "6c5f6c62", "00000000", // table "shoal_lb"
            "0d000200", "616e795f", "706f7274", "00000000", // set "any_port"
            "3c000380", // elements (nested)
            "38000180", // list elem
            "10000180", "0c000100", "0a60000a", "06000000", // key { value }
            "24000280", "20000280", // data { verdict {
            "08000100", "fffffffc", // code NFT_GOTO (be32)
            "12000200", "6166665f", "726e645f", "616e795f", "31000000", // chain
        );
        assert_eq!(hex(&b[16..]), want);
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        assert_eq!(ty, 0x0a0c);
    }

    #[test]
    fn batch_is_framed_and_split_below_64k() {
        let rs = Ruleset {
            table: "t".into(),
            services: (0..3000u32)
                .map(|s| VirtualService {
                    id: format!("s{s}"),
                    vip: Ipv4Addr::from(0x0a60_0000 + s),
                    port: 80,
                    target_port: 8080,
                    backends: (0..10)
                        .map(|b| Ipv4Addr::from(0x0a80_0000 + s * 10 + b))
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let m = Model::from_ruleset(&rs);
        let batch = encode(&m, 100);
        assert_eq!(batch.elements, 3000 + 3000 + 30_000);
        let msgs = netlink::split_msgs(&batch.bytes).unwrap();
        assert_eq!(msgs.len(), batch.msgs.len() + 2);
        assert_eq!(msgs[0].ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[0].payload, &[0, 0, 0, 10]);
        assert_eq!(msgs[0].seq, 100);
        let last = msgs.last().unwrap();
        assert_eq!(last.ty, NFNL_MSG_BATCH_END);
        assert_eq!(last.seq as usize, 100 + batch.msgs.len() + 1);
        let mut counted = 0;
        for (i, m) in msgs[1..msgs.len() - 1].iter().enumerate() {
            assert_eq!(m.seq as usize, 101 + i);
            assert_eq!(batch.map_of(m.seq), Some(batch.msgs[i]));
            assert!(m.payload.len() + 16 <= MAX_MSG);
            assert_eq!(m.flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
            let attrs = netlink::attrs(&m.payload[4..]).unwrap();
            assert_eq!(attrs[2].0, NFTA_SET_ELEM_LIST_ELEMENTS);
            counted += netlink::attrs(attrs[2].1).unwrap().len();
        }
        assert_eq!(counted, batch.elements);
        assert!(batch.msgs.iter().filter(|m| **m == "backends_tcp").count() > 10);
        assert_eq!(batch.map_of(100), None);
        assert_eq!(batch.map_of(101), Some("vips"));
    }

    #[test]
    fn empty_model_has_no_element_messages() {
        let m = Model {
            table: "t".into(),
            ..Model::default()
        };
        let batch = encode(&m, 1);
        assert!(batch.msgs.is_empty());
        assert_eq!(batch.elements, 0);
    }

    #[test]
    fn delta_deletes_then_adds_only_what_changed() {
        let one = |backends: Vec<Ipv4Addr>| {
            Model::from_ruleset(&Ruleset {
                table: "shoal_lb".into(),
                services: vec![VirtualService {
                    id: "web".into(),
                    vip: ip("10.96.0.10"),
                    port: 80,
                    target_port: 8080,
                    backends,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let three = one(vec![ip("10.0.1.1"), ip("10.0.1.2"), ip("10.0.1.3")]);
        let two = one(vec![ip("10.0.1.1"), ip("10.0.1.2")]);
        assert!(encode_delta(&three, &three, 1).is_none());
        let b = encode_delta(&three, &two, 1).unwrap();
        // Deletes: the services element (its verdict changes) and slot 2; adds: the services
        // element with its new chain. Slots 0 and 1 are untouched.
        assert_eq!(b.msgs, vec!["services", "backends_tcp", "services"]);
        assert_eq!(b.elements, 3);
        let types: Vec<u16> = {
            let mut v = vec![];
            let mut off = 0;
            while off + 6 <= b.bytes.len() {
                let len = u32::from_ne_bytes(b.bytes[off..off + 4].try_into().unwrap()) as usize;
                v.push(u16::from_ne_bytes(
                    b.bytes[off + 4..off + 6].try_into().unwrap(),
                ));
                off += (len + 3) & !3;
            }
            v
        };
        let sub = |m| NFNL_SUBSYS_NFTABLES << 8 | m;
        assert_eq!(
            types,
            vec![
                NFNL_MSG_BATCH_BEGIN,
                sub(NFT_MSG_DELSETELEM),
                sub(NFT_MSG_DELSETELEM),
                sub(NFT_MSG_NEWSETELEM),
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
