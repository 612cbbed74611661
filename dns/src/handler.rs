//! Query handling as a pure function of (query bytes, view, settings): no I/O, no locks.
//!
//! Parsing uses hickory-proto (header, question, and every record of the other sections, so
//! malformed messages are caught and EDNS is read). The answer is written straight into a
//! caller-owned buffer in a fixed layout: the question is copied verbatim from the query
//! (keeping the client's letter case), and owner names are compression pointers into it, so
//! a local answer costs no allocation beyond what hickory's parser needs for the question.
//! Every shape of answer is parsed back with hickory's `Message` in the tests.
//!
//! Zone model: the resolver is authoritative for one zone whose apex is the root, holding
//! every name of the view (service, `tasks.`, task, alias and reverse names; they are single
//! labels or sit under no common suffix, so the root is the only apex above all of them).
//! Its one SOA, `. SOA ns.shoal.internal. hostmaster.shoal.internal. 1 3600 600 86400 N`
//! with TTL and MINIMUM both `negative_ttl` = N (RFC 2308), is the answer to an SOA query
//! for the root and the authority record of every negative answer (NXDOMAIN, and NODATA
//! for names that exist without the asked type, SOA included: no name but the apex has
//! one). Without forwarding the zone is the whole namespace: the root and the empty
//! non-terminals above the view's names (`abc` for `web.1.abc`) exist (NODATA), every
//! other name does not (NXDOMAIN). With forwarding, only the view's names and the root's
//! SOA are answered here; everything else (the root's other types, empty non-terminals
//! and unknown names) is forwarded.
//!
//! SRV answers (priority 0, weight 1) carry the A records of their targets in the
//! additional section; over UDP those are dropped first when the answer does not fit, and
//! TC is set only when the SRV records themselves do not fit (RFC 2181 9).
//!
//! A UDP answer whose answer section does not fit keeps as many whole answer records as fit
//! (in the shuffled order) and sets TC, as Docker's resolver does: clients that never retry
//! over TCP (musl before 1.2.4) still get addresses.

use std::cell::Cell;
use std::collections::HashSet;
use std::net::Ipv4Addr;

use hickory_proto::op::{Header, Message, MessageType, OpCode};
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::DnsConfig;
use crate::records::{Records, SrvTarget};

/// Largest UDP payload this server advertises and honours (loopback only, no fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// Classic DNS limit for UDP answers without EDNS.
pub const MIN_UDP_PAYLOAD: u16 = 512;

const HEADER_LEN: usize = 12;
const OPT_LEN: usize = 11;
const A_RR_LEN: usize = 16;
/// Priority and weight of every SRV record: all targets equal (RFC 2782).
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
/// BADVERS (16): 0 in the header, 1 in the OPT extended rcode.
const EXT_RCODE_BADVERS: u8 = 1;

/// How the query arrived: decides the size limit of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What the caller must do after [`Handler::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the bytes left in the output buffer.
    Reply,
    /// The name is outside the view and forwarding is allowed: forward the query as
    /// received (and use [`Handler::servfail`] if every upstream fails).
    Forward,
    /// Stay silent (unparseable header, or a response rather than a query).
    Ignore,
}

/// The per-resolver settings the query path needs, precomputed from [`DnsConfig`].
#[derive(Debug, Clone)]
pub struct Handler {
    ttl: u32,
    has_upstreams: bool,
    /// The zone's SOA record without its owner name (the root): type, class, TTL,
    /// RDLENGTH and RDATA (names uncompressed).
    soa_rr: Box<[u8]>,
}

/// What parsing a query found.
struct Parsed {
    id: u16,
    rd: bool,
    cd: bool,
    /// End of the question section.
    q_end: usize,
    qtype: RecordType,
    qclass: DNSClass,
    /// Lowercase dotted name in `key_buf[..key_len]`; `None` when it cannot match any key
    /// (root, or a label holding a '.').
    key_len: Option<usize>,
    key_buf: [u8; 256],
    /// The name is the root (the zone's apex).
    root: bool,
    /// EDNS: (client payload size, version) when the query had an OPT record.
    edns: Option<(u16, u8)>,
    /// The DO bit of the OPT record.
    dnssec_ok: bool,
}

enum ParseError {
    /// No usable header: stay silent.
    Silent,
    /// Header read: answer with this rcode, no question.
    Reply {
        id: u16,
        op: u8,
        rd: bool,
        rcode: u8,
    },
}

impl Handler {
    pub fn new(config: &DnsConfig) -> Self {
        let mut rdata = Vec::with_capacity(64);
        push_name(&mut rdata, "ns.shoal.internal");
        push_name(&mut rdata, "hostmaster.shoal.internal");
        for v in [1u32, 3600, 600, 86400, config.negative_ttl] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        let mut soa = Vec::with_capacity(10 + rdata.len());
        soa.extend_from_slice(&[0, 6, 0, 1]);
        soa.extend_from_slice(&config.negative_ttl.to_be_bytes());
        soa.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        soa.extend_from_slice(&rdata);
        Handler {
            ttl: config.ttl,
            has_upstreams: !config.upstreams.is_empty(),
            soa_rr: soa.into_boxed_slice(),
        }
    }

    /// Answers `query` from `records` into `out` (cleared first). Never panics; the work
    /// is bounded by the query length.
    pub fn handle(
        &self,
        query: &[u8],
        records: &Records,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        let p = match parse(query) {
            Ok(p) => p,
            Err(ParseError::Silent) => return Outcome::Ignore,
            Err(ParseError::Reply { id, op, rd, rcode }) => {
                write_error(out, id, op, rd, rcode);
                return Outcome::Reply;
            }
        };
        let may_forward = records.forward && self.has_upstreams;
        let limit = limit(transport, p.edns);
        if let Some((_, version)) = p.edns
            && version > 0
        {
            self.begin(out, query, &p, 0, may_forward);
            push_opt(out, EXT_RCODE_BADVERS);
            set_counts(out, 0, 0, 1);
            return Outcome::Reply;
        }

        let class_ok = matches!(p.qclass, DNSClass::IN | DNSClass::ANY);
        let key = match (class_ok, p.key_len) {
            (true, Some(len)) => Some(&p.key_buf[..len]),
            _ => None,
        };
        let wants = |t: RecordType| p.qtype == t || p.qtype == RecordType::ANY;
        let a = key.and_then(|k| records.a.get(k));
        // A name with A records needs its SRV records only for SRV and ANY: the hot path
        // (A, AAAA of a service name) does one hash lookup.
        let srv = match key {
            Some(k) if (a.is_none() || wants(RecordType::SRV)) && !records.srv.is_empty() => {
                records.srv.get(k)
            }
            _ => None,
        };
        let ptr = match (a.is_none() && srv.is_none(), key) {
            (true, Some(k)) => reverse_v4(k).and_then(|ip| records.ptr.get(&ip)),
            _ => None,
        };
        let exists = a.is_some() || ptr.is_some() || srv.is_some();
        // The apex of the zone (see the module docs); its SOA is ours even when forwarding.
        let apex = class_ok && p.root;
        if !exists && may_forward && !(apex && p.qtype == RecordType::SOA) {
            return Outcome::Forward;
        }
        // Not forwarded: the zone is the whole namespace. The apex and the empty
        // non-terminals of the view exist; any other name not in the view does not.
        let nxdomain = !exists && !apex && !key.is_some_and(|k| records.ents.contains(k));

        self.begin(
            out,
            query,
            &p,
            if nxdomain { RCODE_NXDOMAIN } else { 0 },
            may_forward,
        );
        let mut answers = 0usize;
        if let Some(entry) = a.filter(|_| wants(RecordType::A)) {
            let start = out.len();
            for ip in &entry.ips {
                out.extend_from_slice(&[0xC0, HEADER_LEN as u8, 0, 1, 0, 1]);
                out.extend_from_slice(&self.ttl.to_be_bytes());
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&ip.octets());
            }
            answers = entry.ips.len();
            if entry.shuffle {
                shuffle_chunks(&mut out[start..], A_RR_LEN);
            }
        } else if let Some(names) = ptr.filter(|_| wants(RecordType::PTR)) {
            for name in names {
                out.extend_from_slice(&[0xC0, HEADER_LEN as u8, 0, 12, 0, 1]);
                out.extend_from_slice(&self.ttl.to_be_bytes());
                out.extend_from_slice(&(name.len() as u16).to_be_bytes());
                out.extend_from_slice(name);
            }
            answers = names.len();
        }
        let mut srv_start = None;
        if let Some(targets) = srv.filter(|_| wants(RecordType::SRV)) {
            srv_start = Some(out.len());
            for t in targets {
                out.extend_from_slice(&[0xC0, HEADER_LEN as u8, 0, 33, 0, 1]);
                out.extend_from_slice(&self.ttl.to_be_bytes());
                out.extend_from_slice(&(6 + t.wire.len() as u16).to_be_bytes());
                out.extend_from_slice(&SRV_PRIORITY.to_be_bytes());
                out.extend_from_slice(&SRV_WEIGHT.to_be_bytes());
                out.extend_from_slice(&t.port.to_be_bytes());
                out.extend_from_slice(&t.wire);
            }
            answers += targets.len();
        }
        if apex && wants(RecordType::SOA) {
            // Owner: a pointer to the question's name (the root), as every answer record.
            out.extend_from_slice(&[0xC0, HEADER_LEN as u8]);
            out.extend_from_slice(&self.soa_rr);
            answers = 1;
        }
        let mut authorities = 0;
        if answers == 0 {
            out.push(0); // owner: the root
            out.extend_from_slice(&self.soa_rr);
            authorities = 1;
        }
        let additional_start = out.len();
        let mut additionals = 0usize;
        if let (Some(start), Some(targets)) = (srv_start, srv) {
            additionals = self.srv_additional(out, records, targets, start);
        }
        let opt = usize::from(p.edns.is_some());
        // RFC 2181 9: additional data that does not fit is dropped without TC; TC only
        // when the answer section itself does not fit.
        if additionals > 0
            && (out.len() + opt * OPT_LEN > limit || additionals + opt > usize::from(u16::MAX))
        {
            out.truncate(additional_start);
            additionals = 0;
        }
        if out.len() + opt * OPT_LEN > limit || answers > usize::from(u16::MAX) {
            // As many whole answer records as fit, in the order already written (after the
            // shuffle), and TC: clients that never retry over TCP (musl before 1.2.4) still
            // get addresses. Only this rare path walks the records.
            let (end, fit) = whole_records(out, p.q_end, answers, limit - opt * OPT_LEN);
            out.truncate(end);
            out[2] |= 0x02; // TC
            answers = fit;
            authorities = 0;
        }
        if opt == 1 {
            push_opt(out, 0);
        }
        set_counts(out, answers as u16, authorities, (additionals + opt) as u16);
        Outcome::Reply
    }

    /// The A records of every SRV target the view knows (each target once), owner names
    /// compressed to the target names in the SRV records starting at `srv_start`. Returns
    /// the number of records written.
    fn srv_additional(
        &self,
        out: &mut Vec<u8>,
        records: &Records,
        targets: &[SrvTarget],
        srv_start: usize,
    ) -> usize {
        let mut written = 0;
        let mut seen: HashSet<&[u8]> = HashSet::with_capacity(targets.len());
        let mut at = srv_start;
        for t in targets {
            // Name pointer, type, class, TTL, RDLENGTH, priority, weight, port.
            let target_at = at + 18;
            at = target_at + t.wire.len();
            if !seen.insert(&t.key) {
                continue;
            }
            let Some(entry) = records.a.get(&t.key) else {
                continue;
            };
            for ip in &entry.ips {
                match u16::try_from(target_at) {
                    Ok(off) if off <= 0x3FFF => {
                        out.extend_from_slice(&(0xC000 | off).to_be_bytes())
                    }
                    _ => out.extend_from_slice(&t.wire),
                }
                out.extend_from_slice(&[0, 1, 0, 1]);
                out.extend_from_slice(&self.ttl.to_be_bytes());
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&ip.octets());
                written += 1;
            }
        }
        written
    }

    /// SERVFAIL for `query` (after every upstream failed); `false` when the query cannot be
    /// answered at all.
    pub fn servfail(&self, query: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        match parse(query) {
            Ok(p) => {
                self.begin(out, query, &p, RCODE_SERVFAIL, true);
                out[2] &= !0x04; // not authoritative
                let opt = p.edns.is_some();
                if opt {
                    push_opt(out, 0);
                }
                set_counts(out, 0, 0, u16::from(opt));
                true
            }
            Err(ParseError::Reply { id, op, rd, rcode }) => {
                write_error(out, id, op, rd, rcode);
                true
            }
            Err(ParseError::Silent) => false,
        }
    }

    /// Header (counts zero but QD=1) and the question copied from the query.
    fn begin(&self, out: &mut Vec<u8>, query: &[u8], p: &Parsed, rcode: u8, ra: bool) {
        out.extend_from_slice(&p.id.to_be_bytes());
        // QR=1, opcode 0, AA=1, TC=0, RD echoed.
        out.push(0x84 | u8::from(p.rd));
        // RA, Z=0, AD=0, CD echoed, rcode.
        out.push((u8::from(ra) << 7) | (u8::from(p.cd) << 4) | (rcode & 0x0F));
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&query[HEADER_LEN..p.q_end]);
    }
}

/// Convenience for tests and tools: the answer bytes, or `None` for silence / forward.
pub fn handle_to_vec(
    handler: &Handler,
    query: &[u8],
    records: &Records,
    transport: Transport,
) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match handler.handle(query, records, transport, &mut out) {
        Outcome::Reply => Some(out),
        Outcome::Forward | Outcome::Ignore => None,
    }
}

/// What the cache of upstream answers needs to know about a forwarded query.
pub(crate) struct CacheKey {
    /// Flags byte (EDNS present, DO, CD, RD) followed by the question (name lowercased,
    /// type, class) in wire form.
    pub(crate) key: Box<[u8]>,
    /// End of the question in the query (and in a reply to it).
    pub(crate) q_end: usize,
    /// Largest answer the client takes over its transport.
    pub(crate) limit: usize,
    /// Largest UDP answer an upstream may send to this query as forwarded: the client's
    /// EDNS payload size (at least 512), or 512 without EDNS.
    pub(crate) udp_payload: usize,
}

/// The cache key of `query` (`None` when it does not parse as a normal query).
pub(crate) fn cache_key(query: &[u8], transport: Transport) -> Option<CacheKey> {
    let p = parse(query).ok()?;
    let mut key = Vec::with_capacity(1 + p.q_end - HEADER_LEN);
    key.push(
        u8::from(p.edns.is_some())
            | u8::from(p.dnssec_ok) << 1
            | u8::from(p.cd) << 2
            | u8::from(p.rd) << 3,
    );
    // Label lengths (< 64) are never ASCII letters; type and class are copied as they are.
    let name_end = p.q_end - 4;
    key.extend(
        query[HEADER_LEN..name_end]
            .iter()
            .map(u8::to_ascii_lowercase),
    );
    key.extend_from_slice(&query[name_end..p.q_end]);
    Some(CacheKey {
        key: key.into_boxed_slice(),
        q_end: p.q_end,
        limit: limit(transport, p.edns),
        udp_payload: p
            .edns
            .map_or(MIN_UDP_PAYLOAD, |(size, _)| size.max(MIN_UDP_PAYLOAD))
            .into(),
    })
}

/// Size limit of the answer for this transport and client EDNS.
fn limit(transport: Transport, edns: Option<(u16, u8)>) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match edns {
            Some((size, _)) => size.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD).into(),
            None => MIN_UDP_PAYLOAD.into(),
        },
    }
}

fn parse(query: &[u8]) -> Result<Parsed, ParseError> {
    if query.len() < HEADER_LEN {
        return Err(ParseError::Silent);
    }
    let mut dec = BinDecoder::new(query);
    let header = Header::read(&mut dec).map_err(|_| ParseError::Silent)?;
    let md = header.metadata;
    if md.message_type != MessageType::Query {
        return Err(ParseError::Silent);
    }
    let op = u8::from(md.op_code);
    let reply = |rcode| ParseError::Reply {
        id: md.id,
        op,
        // RD is defined only for QUERY (RFC 1035 4.1.1): a NOTIMP answer to another opcode
        // echoes the opcode and the id, nothing else.
        rd: md.recursion_desired && md.op_code == OpCode::Query,
        rcode,
    };
    if md.op_code != OpCode::Query {
        return Err(reply(RCODE_NOTIMP));
    }
    if header.counts.queries != 1 {
        return Err(reply(RCODE_FORMERR));
    }
    let question = hickory_proto::op::Query::read(&mut dec).map_err(|_| reply(RCODE_FORMERR))?;
    let q_end = dec.index();
    for (count, additional) in [
        (header.counts.answers, false),
        (header.counts.authorities, false),
    ] {
        if count > 0 {
            Message::read_records(&mut dec, count.into(), additional, md.op_code)
                .map_err(|_| reply(RCODE_FORMERR))?;
        }
    }
    let mut edns = None;
    let mut dnssec_ok = false;
    if header.counts.additionals > 0 {
        let (_, e, _) =
            Message::read_records(&mut dec, header.counts.additionals.into(), true, md.op_code)
                .map_err(|_| reply(RCODE_FORMERR))?;
        dnssec_ok = e.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        edns = e.map(|e| (e.max_payload(), e.version()));
    }

    let mut p = Parsed {
        id: md.id,
        rd: md.recursion_desired,
        cd: md.checking_disabled,
        q_end,
        qtype: question.query_type(),
        qclass: question.query_class(),
        key_len: None,
        key_buf: [0; 256],
        root: query.get(HEADER_LEN) == Some(&0),
        edns,
        dnssec_ok,
    };
    // Walk the raw question name: lowercase dotted key and the offset of its last label.
    let mut i = HEADER_LEN;
    let mut len = 0usize;
    let mut matchable = true;
    loop {
        let Some(&l) = query.get(i) else {
            return Err(reply(RCODE_FORMERR));
        };
        if l == 0 {
            break;
        }
        if l & 0xC0 != 0 {
            // A compression pointer in a question at offset 12 can only point backwards
            // into the header: nonsense.
            return Err(reply(RCODE_FORMERR));
        }
        let l = usize::from(l);
        let Some(label) = query.get(i + 1..i + 1 + l) else {
            return Err(reply(RCODE_FORMERR));
        };
        if len + l + 1 > p.key_buf.len() {
            return Err(reply(RCODE_FORMERR));
        }
        if len > 0 {
            p.key_buf[len] = b'.';
            len += 1;
        }
        for (dst, &b) in p.key_buf[len..len + l].iter_mut().zip(label) {
            matchable &= b != b'.';
            *dst = b.to_ascii_lowercase();
        }
        len += l;
        i += 1 + l;
    }
    if matchable && len > 0 {
        p.key_len = Some(len);
    }
    Ok(p)
}

/// The first of the `count` answer records written from `start` in `out` that end at most at
/// `budget` (and at most `u16::MAX` of them): the end of the last one, and how many. Every
/// answer record this module writes has a 2-byte compressed owner name, so a record is 12
/// bytes of owner, type, class, TTL and RDLENGTH, then RDLENGTH bytes of data.
fn whole_records(out: &[u8], start: usize, count: usize, budget: usize) -> (usize, usize) {
    let mut at = start;
    let mut n = 0;
    while n < count.min(usize::from(u16::MAX)) {
        let Some(&[hi, lo]) = out.get(at + 10..at + 12) else {
            break;
        };
        let end = at + 12 + usize::from(u16::from_be_bytes([hi, lo]));
        if end > budget || end > out.len() {
            break;
        }
        at = end;
        n += 1;
    }
    (at, n)
}

/// End of the (single) question of a message: after its uncompressed name, type and class.
pub(crate) fn question_end(msg: &[u8]) -> Option<usize> {
    let mut i = HEADER_LEN;
    loop {
        let l = usize::from(*msg.get(i)?);
        if l == 0 {
            break;
        }
        if l & 0xC0 != 0 {
            return None;
        }
        i += 1 + l;
    }
    let end = i + 5;
    (end <= msg.len()).then_some(end)
}

/// `d.c.b.a.in-addr.arpa` (normalised) to `a.b.c.d`.
fn reverse_v4(key: &[u8]) -> Option<Ipv4Addr> {
    let rest = key.strip_suffix(b".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = rest.split(|&b| b == b'.');
    for slot in octets.iter_mut().rev() {
        let part = parts.next()?;
        if part.is_empty()
            || part.len() > 3
            || (part.len() > 1 && part[0] == b'0')
            || !part.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        let v = part
            .iter()
            .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
        *slot = u8::try_from(v).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

fn write_error(out: &mut Vec<u8>, id: u16, op: u8, rd: bool, rcode: u8) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80 | ((op & 0x0F) << 3) | u8::from(rd));
    out.push(rcode & 0x0F);
    out.extend_from_slice(&[0; 8]);
}

/// An OPT record: our payload size, version 0, no flags, no options.
fn push_opt(out: &mut Vec<u8>, ext_rcode: u8) {
    out.push(0);
    out.extend_from_slice(&41u16.to_be_bytes());
    out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, 0, 0, 0, 0]);
}

fn set_counts(out: &mut [u8], an: u16, ns: u16, ar: u16) {
    out[6..8].copy_from_slice(&an.to_be_bytes());
    out[8..10].copy_from_slice(&ns.to_be_bytes());
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

thread_local! {
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// xorshift64*: cheap, per thread, seeded from the OS once. Only used to order answers.
fn next_random() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        if x == 0 {
            x = rand::random::<u64>() | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Fisher-Yates over fixed-size chunks of `buf`, in place.
fn shuffle_chunks(buf: &mut [u8], size: usize) {
    let n = buf.len() / size;
    for i in (1..n).rev() {
        let j = (next_random() % (i as u64 + 1)) as usize;
        if i != j {
            let (lo, hi) = buf.split_at_mut(i * size);
            lo[j * size..(j + 1) * size].swap_with_slice(&mut hi[..size]);
        }
    }
}

#[cfg(test)]
mod tests;
