//! A bounded cache of upstream answers, shared by every attached container (it holds
//! upstream data, not cluster data; only views that may forward ever reach it).
//!
//! Keyed by the question (name lowercased, type, class) and the query flags that change an
//! upstream's answer: EDNS present, DO, CD, RD. An answer is kept for the smallest TTL of
//! its records ([`MAX_TTL`] at most); a negative answer (NXDOMAIN, or NOERROR without
//! answers) only when it carries an SOA, for min(SOA TTL, SOA MINIMUM) and at most
//! [`MAX_NEGATIVE_TTL`] (RFC 2308). Never cached: truncated answers, any rcode other than
//! NOERROR and NXDOMAIN (so no SERVFAIL), answers with a TTL of 0, and anything that does
//! not parse. A hit is served with the client's id and question bytes (its letter case)
//! and every TTL decreased by the whole seconds spent in the cache. A hit too large for
//! the client's transport (a UDP client with a smaller EDNS buffer) is a miss. When full,
//! the oldest insertion is evicted (FIFO).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::handler::CacheKey;

/// Longest time a positive answer is kept (seconds).
pub(crate) const MAX_TTL: u32 = 3600;
/// Longest time a negative answer is kept (seconds).
pub(crate) const MAX_NEGATIVE_TTL: u32 = 300;

const HEADER_LEN: usize = 12;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;

pub(crate) struct Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Box<[u8]>, Entry>,
    /// Insertion order: (key, generation); stale when the entry was replaced since.
    order: VecDeque<(Box<[u8]>, u64)>,
    generation: u64,
}

struct Entry {
    reply: Box<[u8]>,
    /// Offsets of the TTL field of every record but OPT.
    ttls: Box<[u16]>,
    stored: Instant,
    expires: Instant,
    generation: u64,
}

impl Cache {
    /// A cache of at most `capacity` answers (0: disabled).
    pub(crate) fn new(capacity: usize) -> Self {
        Cache {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of entries (expired ones included until they are evicted or looked up).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// On a hit writes the answer to `query` into `out` (cleared first) and returns true.
    pub(crate) fn get(
        &self,
        key: &CacheKey,
        query: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        if self.capacity == 0 || query.len() < key.q_end {
            return false;
        }
        let mut inner = self.lock();
        let Some(entry) = inner.map.get(&key.key) else {
            return false;
        };
        if now >= entry.expires {
            inner.map.remove(&key.key);
            return false;
        }
        if entry.reply.len() > key.limit || entry.reply.len() < key.q_end {
            return false;
        }
        out.clear();
        out.extend_from_slice(&entry.reply);
        let elapsed = u32::try_from(now.saturating_duration_since(entry.stored).as_secs())
            .unwrap_or(u32::MAX);
        for &at in entry.ttls.iter() {
            let at = usize::from(at);
            let ttl = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
        }
        drop(inner);
        out[..2].copy_from_slice(&query[..2]);
        out[HEADER_LEN..key.q_end].copy_from_slice(&query[HEADER_LEN..key.q_end]);
        true
    }

    /// Stores `reply` (an upstream's answer to the query of `key`) if it may be cached.
    pub(crate) fn insert(&self, key: &CacheKey, reply: &[u8], now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let Some(Analysis { ttls, ttl, len }) = analyse(reply) else {
            return;
        };
        if reply.len() < key.q_end
            || !reply[HEADER_LEN..key.q_end].eq_ignore_ascii_case(&key.key[1..])
        {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        while inner.map.len() >= self.capacity && !inner.map.contains_key(&key.key) {
            let Some((old, generation)) = inner.order.pop_front() else {
                break;
            };
            if inner
                .map
                .get(&old)
                .is_some_and(|e| e.generation == generation)
            {
                inner.map.remove(&old);
            }
        }
        inner.generation += 1;
        let generation = inner.generation;
        inner.map.insert(
            key.key.clone(),
            Entry {
                reply: strip_opt_options(&reply[..len]),
                ttls,
                stored: now,
                expires: now + Duration::from_secs(ttl.into()),
                generation,
            },
        );
        inner.order.push_back((key.key.clone(), generation));
        if inner.order.len() > 2 * self.capacity + 16 {
            let map = &inner.map;
            inner
                .order
                .retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }
}

/// What [`analyse`] found in a cacheable reply.
pub(crate) struct Analysis {
    /// Offsets of the TTL field of every record but OPT.
    ttls: Box<[u16]>,
    /// How long to keep it (seconds).
    ttl: u32,
    /// Where the message ends (trailing bytes are not kept).
    len: usize,
}

/// Whether an upstream reply may be cached, and how. EDNS options (cookies of the first
/// client, padding, ...) must not be replayed to others: an OPT record with options is
/// only accepted as the last record, so that they can be cut off.
pub(crate) fn analyse(reply: &[u8]) -> Option<Analysis> {
    if reply.len() < HEADER_LEN || reply.len() > usize::from(u16::MAX) {
        return None;
    }
    let (flags, rcode) = (reply[2], reply[3] & 0x0F);
    // QR set, opcode QUERY, TC clear; NOERROR or NXDOMAIN.
    if flags & 0x80 == 0 || flags & 0x78 != 0 || flags & 0x02 != 0 || !matches!(rcode, 0 | 3) {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([reply[i], reply[i + 1]]));
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 {
        return None;
    }
    let mut at = skip_name(reply, HEADER_LEN)? + 4;
    let mut ttls = Vec::with_capacity(an + ns + ar);
    let mut min_ttl = u32::MAX;
    let mut soa: Option<u32> = None;
    let total = an + ns + ar;
    for i in 0..total {
        at = skip_name(reply, at)?;
        let fixed = reply.get(at..at + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata = reply.get(at + 10..at + 10 + rdlen)?;
        if rtype == TYPE_OPT {
            if rdlen > 0 && i + 1 != total {
                return None;
            }
        } else {
            ttls.push(u16::try_from(at + 4).ok()?);
            min_ttl = min_ttl.min(ttl);
            let in_authority = i >= an && i < an + ns;
            if rtype == TYPE_SOA && in_authority && rdlen >= 22 {
                let m = &rdata[rdlen - 4..];
                soa = Some(ttl.min(u32::from_be_bytes([m[0], m[1], m[2], m[3]])));
            }
        }
        at += 10 + rdlen;
    }
    let negative = rcode == 3 || an == 0;
    let ttl = if negative {
        min_ttl.min(soa?).min(MAX_NEGATIVE_TTL)
    } else {
        min_ttl.min(MAX_TTL)
    };
    (ttl > 0).then(|| Analysis {
        ttls: ttls.into_boxed_slice(),
        ttl,
        len: at,
    })
}

/// `msg` (walked by [`analyse`]) without the options of its OPT record, if it has one
/// (then it is the last record).
fn strip_opt_options(msg: &[u8]) -> Box<[u8]> {
    let mut out = msg.to_vec();
    let ar = u16::from_be_bytes([msg[10], msg[11]]);
    if ar == 0 {
        return out.into_boxed_slice();
    }
    // The last record: find it by walking again (cheap; only on insert).
    let count = |i: usize| usize::from(u16::from_be_bytes([msg[i], msg[i + 1]]));
    let total = count(6) + count(8) + count(10);
    let Some(mut at) = skip_name(msg, HEADER_LEN).map(|a| a + 4) else {
        return out.into_boxed_slice();
    };
    for i in 0..total {
        let Some(fixed_at) = skip_name(msg, at) else {
            break;
        };
        let rtype = u16::from_be_bytes([msg[fixed_at], msg[fixed_at + 1]]);
        let rdlen = usize::from(u16::from_be_bytes([msg[fixed_at + 8], msg[fixed_at + 9]]));
        if rtype == TYPE_OPT && i + 1 == total {
            out.truncate(fixed_at + 10);
            out[fixed_at + 8..fixed_at + 10].copy_from_slice(&[0, 0]);
            break;
        }
        at = fixed_at + 10 + rdlen;
    }
    out.into_boxed_slice()
}

/// The offset after the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let l = *msg.get(at)?;
        match l & 0xC0 {
            0 if l == 0 => return Some(at + 1),
            0 => at += 1 + usize::from(l),
            0xC0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Transport, cache_key};
    use hickory_proto::op::{Edns, Message, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn query(name: &str, rtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some((size, dnssec_ok)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// An upstream answer: `ips` with `ttl`, or NXDOMAIN with an SOA when empty.
    fn reply(q: &[u8], ips: &[(u8, u32)], soa: Option<(u32, u32)>) -> Vec<u8> {
        let q = Message::from_vec(q).unwrap();
        let mut m = Message::response(q.metadata.id, q.metadata.op_code);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        let name = q.queries[0].name().clone();
        m.add_query(q.queries[0].clone());
        for &(d, ttl) in ips {
            m.add_answer(Record::from_rdata(
                name.clone(),
                ttl,
                RData::A(A::new(192, 0, 2, d)),
            ));
        }
        if let Some((ttl, minimum)) = soa {
            m.metadata.response_code = if ips.is_empty() {
                ResponseCode::NXDomain
            } else {
                ResponseCode::NoError
            };
            let soa = SOA::new(
                Name::from_ascii("ns.example.").unwrap(),
                Name::from_ascii("h.example.").unwrap(),
                1,
                3600,
                600,
                86400,
                minimum,
            );
            m.add_authority(Record::from_rdata(
                Name::from_ascii("example.").unwrap(),
                ttl,
                RData::SOA(soa),
            ));
        }
        if let Some(e) = q.edns {
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn key(q: &[u8]) -> CacheKey {
        cache_key(q, Transport::Udp).unwrap()
    }

    fn ttls(out: &[u8]) -> Vec<u32> {
        let m = Message::from_vec(out).unwrap();
        m.answers
            .iter()
            .chain(&m.authorities)
            .map(|r| r.ttl)
            .collect()
    }

    #[test]
    fn hit_rewrites_id_question_and_ttls() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query("Example.COM.", RecordType::A, None);
        cache.insert(&key(&q), &reply(&q, &[(1, 60), (2, 30)], None), t0);
        let mut out = Vec::new();
        // Another id and letter case.
        let mut q2 = query("eXample.com.", RecordType::A, None);
        q2[..2].copy_from_slice(&[0xAB, 0xCD]);
        assert!(cache.get(&key(&q2), &q2, t0 + Duration::from_millis(10_500), &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0xABCD);
        assert_eq!(m.queries[0].name().to_ascii(), "eXample.com.");
        assert_eq!(ttls(&out), vec![50, 20]);
        // Expired after the smallest TTL.
        assert!(cache.get(&key(&q2), &q2, t0 + Duration::from_millis(29_900), &mut out));
        assert_eq!(ttls(&out), vec![31, 1]);
        assert!(!cache.get(&key(&q2), &q2, t0 + Duration::from_secs(30), &mut out));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn keyed_by_type_edns_and_do() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query("example.com.", RecordType::A, None);
        cache.insert(&key(&q), &reply(&q, &[(1, 60)], None), t0);
        let mut out = Vec::new();
        for other in [
            query("example.com.", RecordType::AAAA, None),
            query("example.com.", RecordType::A, Some((1232, false))),
            query("example.com.", RecordType::A, Some((1232, true))),
            query("example.org.", RecordType::A, None),
        ] {
            assert!(!cache.get(&key(&other), &other, t0, &mut out));
        }
        let q = query("example.com.", RecordType::A, Some((1232, true)));
        cache.insert(&key(&q), &reply(&q, &[(1, 60)], None), t0);
        assert!(cache.get(&key(&q), &q, t0, &mut out));
        assert!(Message::from_vec(&out).unwrap().edns.is_some());
    }

    #[test]
    fn negative_answers_and_what_is_never_cached() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let mut out = Vec::new();
        // NXDOMAIN: min(SOA TTL, MINIMUM), capped at MAX_NEGATIVE_TTL.
        let q = query("nx.example.", RecordType::A, None);
        cache.insert(&key(&q), &reply(&q, &[], Some((900, 20))), t0);
        assert!(cache.get(&key(&q), &q, t0 + Duration::from_secs(19), &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(!cache.get(&key(&q), &q, t0 + Duration::from_secs(20), &mut out));
        let q = query("nx2.example.", RecordType::A, None);
        cache.insert(&key(&q), &reply(&q, &[], Some((9000, 9000))), t0);
        assert!(cache.get(&key(&q), &q, t0 + Duration::from_secs(299), &mut out));
        assert!(!cache.get(&key(&q), &q, t0 + Duration::from_secs(300), &mut out));
        // Positive answers are capped at MAX_TTL.
        let q = query("long.example.", RecordType::A, None);
        cache.insert(&key(&q), &reply(&q, &[(1, 86400)], None), t0);
        let late = t0 + Duration::from_secs(u64::from(MAX_TTL));
        assert!(!cache.get(&key(&q), &q, late, &mut out));

        let never = |r: Vec<u8>, q: &[u8]| {
            let cache = Cache::new(10);
            cache.insert(&key(q), &r, t0);
            assert_eq!(cache.len(), 0, "{r:02x?}");
        };
        let q = query("x.example.", RecordType::A, None);
        // NXDOMAIN without SOA, TTL 0, SERVFAIL, REFUSED, truncated, no question, garbage.
        never(reply(&q, &[], None), &q);
        never(reply(&q, &[(1, 0)], None), &q);
        for rcode in [2u8, 5] {
            let mut r = reply(&q, &[(1, 60)], None);
            r[3] = (r[3] & 0xF0) | rcode;
            never(r, &q);
        }
        let mut r = reply(&q, &[(1, 60)], None);
        r[2] |= 0x02;
        never(r, &q);
        let mut r = reply(&q, &[(1, 60)], None);
        r[5] = 0;
        never(r, &q);
        let r = reply(&q, &[(1, 60)], None);
        never(r[..r.len() - 1].to_vec(), &q);
        // An answer for another question.
        let other = query("y.example.", RecordType::A, None);
        never(reply(&other, &[(1, 60)], None), &q);
        // Disabled.
        let off = Cache::new(0);
        off.insert(&key(&q), &reply(&q, &[(1, 60)], None), t0);
        assert!(!off.get(&key(&q), &q, t0, &mut out));
    }

    #[test]
    fn too_large_for_the_client_is_a_miss() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query("big.example.", RecordType::A, Some((4096, false)));
        let ips: Vec<(u8, u32)> = (0..90).map(|d| (d, 60)).collect();
        cache.insert(&key(&q), &reply(&q, &ips, None), t0);
        let mut out = Vec::new();
        assert!(cache.get(&key(&q), &q, t0, &mut out));
        assert!(out.len() > 1232);
        let small = query("big.example.", RecordType::A, Some((1232, false)));
        assert!(!cache.get(&key(&small), &small, t0, &mut out));
        let tcp = cache_key(&small, Transport::Tcp).unwrap();
        assert!(cache.get(&tcp, &small, t0, &mut out));
    }

    #[test]
    fn edns_options_are_not_replayed() {
        let cache = Cache::new(10);
        let t0 = Instant::now();
        let q = query("example.com.", RecordType::A, Some((1232, false)));
        let mut r = reply(&q, &[(1, 60)], None);
        // A COOKIE option (client and server cookie) in the upstream's OPT, and junk after
        // the message.
        let opt_rdlen = r.len() - 2;
        assert_eq!(&r[opt_rdlen..], &[0, 0]);
        let cookie = [
            0, 10, 0, 16, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
        ];
        r[opt_rdlen..].copy_from_slice(&(cookie.len() as u16).to_be_bytes());
        r.extend_from_slice(&cookie);
        assert!(
            Message::from_vec(&r)
                .unwrap()
                .edns
                .unwrap()
                .options()
                .as_ref()
                .len()
                == 1
        );
        r.extend_from_slice(&[0xFF; 3]);
        cache.insert(&key(&q), &r, t0);
        let mut out = Vec::new();
        assert!(cache.get(&key(&q), &q, t0, &mut out));
        let m = Message::from_vec(&out).unwrap();
        assert!(m.edns.unwrap().options().as_ref().is_empty());
        assert_eq!(out.len(), r.len() - 3 - cookie.len());
    }

    #[test]
    fn bounded_fifo_eviction() {
        let cache = Cache::new(3);
        let t0 = Instant::now();
        let qs: Vec<Vec<u8>> = (0..5)
            .map(|i| query(&format!("n{i}.example."), RecordType::A, None))
            .collect();
        for q in &qs {
            cache.insert(&key(q), &reply(q, &[(1, 60)], None), t0);
            // Re-inserting an existing key does not evict anything.
            cache.insert(&key(q), &reply(q, &[(1, 60)], None), t0);
            assert!(cache.len() <= 3);
        }
        let mut out = Vec::new();
        let hits: Vec<bool> = qs
            .iter()
            .map(|q| cache.get(&key(q), q, t0, &mut out))
            .collect();
        assert_eq!(hits, [false, false, true, true, true]);
        assert!(cache.lock().order.len() <= 2 * 3 + 16);
    }
}
