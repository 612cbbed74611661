use std::net::SocketAddr;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

fn ip(d: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, d)
}

fn handler(upstreams: bool) -> Handler {
    let mut config = DnsConfig {
        negative_ttl: 7,
        ..DnsConfig::default()
    };
    if upstreams {
        config.upstreams = vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap()];
    }
    Handler::new(&config)
}

fn view() -> Records {
    let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
    Records::builder()
        .a("web", &[ip(2)], false)
        .a("tasks.web", &[ip(3), ip(4), ip(5), ip(6)], true)
        .a("ordered", &[ip(3), ip(4), ip(5), ip(6)], false)
        .a("many", &many, false)
        .ptr(ip(3), "web.1.abc")
        .build()
}

fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(h: &Handler, r: &Records, q: &[u8], t: Transport) -> Message {
    let bytes = handle_to_vec(h, q, r, t).expect("a reply");
    let m = Message::from_vec(&bytes).expect("reply parses");
    assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

fn a_answers(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0,
            other => panic!("not A: {other:?}"),
        })
        .collect()
}

fn soa_of(m: &Message) -> (String, u32, u32) {
    assert_eq!(m.authorities.len(), 1, "{m:?}");
    let rec = &m.authorities[0];
    match &rec.data {
        RData::SOA(soa) => (rec.name.to_ascii(), rec.ttl, soa.minimum),
        other => panic!("not SOA: {other:?}"),
    }
}

#[test]
fn a_record_case_insensitive_question_echoed() {
    let (h, r) = (handler(false), view());
    let m = ask(&h, &r, &query("WeB.", RecordType::A, None), Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative && m.metadata.recursion_desired);
    assert!(!m.metadata.recursion_available);
    assert_eq!(a_answers(&m), vec![ip(2)]);
    assert_eq!(m.answers[0].ttl, 5);
    assert_eq!(m.queries[0].name().to_ascii(), "WeB.");
    assert_eq!(m.answers[0].name.to_ascii(), "WeB.");
    assert!(m.edns.is_none());
    // Relative query names (no trailing dot on the wire never happens, but `web` == `web.`).
    let m = ask(&h, &r, &query("web", RecordType::A, None), Transport::Tcp);
    assert_eq!(a_answers(&m), vec![ip(2)]);
}

#[test]
fn shuffle_only_when_flagged() {
    let (h, r) = (handler(false), view());
    let mut orders = std::collections::HashSet::new();
    for _ in 0..200 {
        let m = ask(
            &h,
            &r,
            &query("tasks.web", RecordType::A, None),
            Transport::Udp,
        );
        let mut got = a_answers(&m);
        orders.insert(got.clone());
        got.sort();
        assert_eq!(got, vec![ip(3), ip(4), ip(5), ip(6)]);
    }
    assert!(orders.len() > 5, "answers not shuffled: {orders:?}");
    for _ in 0..20 {
        let m = ask(
            &h,
            &r,
            &query("ordered", RecordType::A, None),
            Transport::Udp,
        );
        assert_eq!(a_answers(&m), vec![ip(3), ip(4), ip(5), ip(6)]);
    }
}

#[test]
fn nodata_for_other_types() {
    let (h, r) = (handler(true), view());
    for t in [
        RecordType::AAAA,
        RecordType::MX,
        RecordType::TXT,
        RecordType::SRV,
    ] {
        let m = ask(&h, &r, &query("tasks.web.", t, None), Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // The SOA of the one zone, at the root (see one_zone_at_the_root).
        assert_eq!(soa_of(&m), (".".to_string(), 7, 7));
        assert!(m.metadata.recursion_available);
    }
    // ANY returns the A records.
    let m = ask(&h, &r, &query("web", RecordType::ANY, None), Transport::Udp);
    assert_eq!(a_answers(&m), vec![ip(2)]);
}

#[test]
fn ptr_records() {
    let (h, r) = (handler(false), view());
    let m = ask(
        &h,
        &r,
        &query("3.0.0.10.IN-ADDR.ARPA.", RecordType::PTR, None),
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    match &m.answers[0].data {
        RData::PTR(p) => assert_eq!(p.0.to_ascii(), "web.1.abc."),
        other => panic!("{other:?}"),
    }
    // The reverse name exists: other types are NODATA.
    let m = ask(
        &h,
        &r,
        &query("3.0.0.10.in-addr.arpa.", RecordType::A, None),
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // Reverse names live in the same zone as the others: its SOA is at the root.
    assert_eq!(soa_of(&m).0, ".");
    // Unknown address, and names that are not addresses.
    for name in ["9.0.0.10.in-addr.arpa.", "03.0.0.10.in-addr.arpa."] {
        let m = ask(&h, &r, &query(name, RecordType::PTR, None), Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    // Not an address, but the empty non-terminal above 3.0.0.10.in-addr.arpa: it exists
    // in the zone (NODATA; it was NXDOMAIN, which denied the name below it, RFC 8020).
    let m = ask(
        &h,
        &r,
        &query("0.0.10.in-addr.arpa.", RecordType::PTR, None),
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(soa_of(&m).0, ".");
    assert_eq!(
        reverse_v4(b"4.3.2.1.in-addr.arpa"),
        Some(Ipv4Addr::new(1, 2, 3, 4))
    );
    assert_eq!(reverse_v4(b"256.3.2.1.in-addr.arpa"), None);
    assert_eq!(reverse_v4(b"5.4.3.2.1.in-addr.arpa"), None);
}

#[test]
fn unknown_names_forward_or_nxdomain() {
    let r = view();
    let q = query("example.com.", RecordType::A, None);
    let mut out = Vec::new();
    assert_eq!(
        handler(true).handle(&q, &r, Transport::Udp, &mut out),
        Outcome::Forward
    );
    // No upstreams: NXDOMAIN with the SOA of the zone, whose apex is the root (not `com.`:
    // an SOA owned by `com.` claimed a zone this resolver does not serve).
    let m = ask(&handler(false), &r, &q, Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_of(&m), (".".to_string(), 7, 7));
    // The view forbids forwarding.
    let internal = Records::builder()
        .a("web", &[ip(2)], false)
        .forward(false)
        .build();
    let m = ask(&handler(true), &internal, &q, Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(!m.metadata.recursion_available);
    // The root without upstreams: the apex of the zone exists, so NS there is NODATA (it
    // was NXDOMAIN, which denied the apex of the SOA it carried).
    let m = ask(
        &handler(false),
        &r,
        &query(".", RecordType::NS, None),
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(soa_of(&m).0, ".");
    // Another class is never answered locally.
    let mut q = Message::query();
    let mut chaos = Query::query(Name::from_ascii("web.").unwrap(), RecordType::A);
    chaos.set_query_class(DNSClass::CH);
    q.add_query(chaos);
    let m = ask(&handler(false), &r, &q.to_vec().unwrap(), Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn truncation_and_edns() {
    let (h, r) = (handler(false), view());
    // 100 A records: about 1.6 kB. Truncated: the records that fit (see
    // truncated_udp_answer_carries_whole_records).
    let m = ask(&h, &r, &query("many", RecordType::A, None), Transport::Udp);
    assert!(m.metadata.truncation);
    assert_eq!(m.answers.len(), 30);
    assert_eq!(m.queries.len(), 1);
    let m = ask(
        &h,
        &r,
        &query("many", RecordType::A, Some(1232)),
        Transport::Udp,
    );
    assert!(m.metadata.truncation);
    assert_eq!(m.answers.len(), 74);
    assert_eq!(m.edns.as_ref().unwrap().max_payload(), MAX_UDP_PAYLOAD);
    let m = ask(
        &h,
        &r,
        &query("many", RecordType::A, Some(4096)),
        Transport::Udp,
    );
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    assert!(m.edns.is_some());
    let m = ask(&h, &r, &query("many", RecordType::A, None), Transport::Tcp);
    assert!(!m.metadata.truncation);
    assert_eq!(a_answers(&m).len(), 100);
    // A tiny EDNS size counts as 512.
    let m = ask(
        &h,
        &r,
        &query("web", RecordType::A, Some(100)),
        Transport::Udp,
    );
    assert_eq!(a_answers(&m), vec![ip(2)]);
    // EDNS version 1: BADVERS.
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("web.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    q.set_edns(e);
    let m = ask(&h, &r, &q.to_vec().unwrap(), Transport::Udp);
    assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
    assert_eq!(m.edns.as_ref().unwrap().version(), 0);
}

#[test]
fn errors() {
    let (h, r) = (handler(false), view());
    let good = query("web", RecordType::A, None);
    let reply = |q: &[u8]| handle_to_vec(&h, q, &r, Transport::Udp);
    // Too short, or a response: silence.
    assert_eq!(reply(&good[..11]), None);
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(reply(&resp), None);
    let rcode = |q: &[u8]| {
        Message::from_vec(&reply(q).unwrap())
            .unwrap()
            .metadata
            .response_code
    };
    // Truncated question.
    assert_eq!(rcode(&good[..good.len() - 1]), ResponseCode::FormErr);
    assert_eq!(rcode(&good[..13]), ResponseCode::FormErr);
    // No question, two questions.
    let mut q = good.clone();
    q[5] = 0;
    assert_eq!(rcode(&q), ResponseCode::FormErr);
    q[5] = 2;
    assert_eq!(rcode(&q), ResponseCode::FormErr);
    // An additional record announced but missing.
    let mut q = good.clone();
    q[11] = 1;
    assert_eq!(rcode(&q), ResponseCode::FormErr);
    // A compression pointer as question name.
    let mut q = good[..12].to_vec();
    q.extend_from_slice(&[0xC0, 0x00, 0, 1, 0, 1]);
    assert_eq!(rcode(&q), ResponseCode::FormErr);
    // Opcode STATUS: NOTIMP.
    let mut q = good.clone();
    q[2] = (q[2] & 0x87) | (2 << 3);
    assert_eq!(rcode(&q), ResponseCode::NotImp);
    // SERVFAIL for a forwarded query.
    let mut out = Vec::new();
    assert!(h.servfail(&query("x.org", RecordType::A, Some(1232)), &mut out));
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries[0].name().to_ascii(), "x.org.");
    assert!(m.edns.is_some());
    assert!(!h.servfail(&[1, 2, 3], &mut out));
}

/// A random but well-formed query: names from the view (SRV, A, PTR) or random labels,
/// any type, with or without EDNS (random size, DO bit, version 0 or 1).
fn random_query(rng: &mut StdRng) -> Vec<u8> {
    const NAMES: [&str; 9] = [
        "web",
        "tasks.web",
        "many",
        "_80._tcp.web",
        "_80._tcp.mid",
        "_80._tcp.lots",
        "web.1.abc",
        "3.0.0.10.in-addr.arpa",
        "h03.some-long-name.x",
    ];
    const TYPES: [RecordType; 8] = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::PTR,
        RecordType::ANY,
        RecordType::SOA,
        RecordType::TXT,
        RecordType::NS,
    ];
    let name = if rng.random_bool(0.8) {
        NAMES[rng.random_range(0..NAMES.len())].to_string()
    } else {
        (0..rng.random_range(1..5))
            .map(|_| {
                (0..rng.random_range(1..12))
                    .map(|_| char::from(rng.random_range(b'a'..=b'z')))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut m = Message::query();
    m.metadata.id = rng.random();
    m.metadata.recursion_desired = rng.random();
    m.metadata.checking_disabled = rng.random();
    m.add_query(Query::query(
        Name::from_ascii(&name).unwrap(),
        TYPES[rng.random_range(0..TYPES.len())],
    ));
    if rng.random_bool(0.6) {
        let mut e = Edns::new();
        e.set_max_payload(rng.random_range(0..6000));
        e.set_dnssec_ok(rng.random());
        e.set_version(u8::from(rng.random_bool(0.1)));
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Flips, overwrites, truncates, inserts and splices bytes.
fn mutate(rng: &mut StdRng, p: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..rng.random_range(1..6) {
        match rng.random_range(0..5) {
            0 if !p.is_empty() => {
                let at = rng.random_range(0..p.len());
                p[at] ^= 1 << rng.random_range(0..8);
            }
            1 if !p.is_empty() => {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
            2 => {
                let at = rng.random_range(0..=p.len());
                p.truncate(at);
            }
            3 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                let to = rng.random_range(from..=other.len());
                let at = rng.random_range(0..=p.len());
                p.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                let at = rng.random_range(0..=p.len());
                p.insert(at, rng.random());
            }
        }
    }
}

/// An upstream-like answer to `query` (A records with random TTLs, or NXDOMAIN + SOA).
fn upstream_reply(rng: &mut StdRng, query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.checking_disabled = q.metadata.checking_disabled;
    let question = q.queries.first()?.clone();
    let name = question.name().clone();
    m.add_query(question);
    if rng.random_bool(0.7) {
        for d in 0..rng.random_range(1..5u8) {
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                name.clone(),
                rng.random_range(0..100),
                RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, d)),
            ));
        }
    } else {
        m.metadata.response_code = ResponseCode::NXDomain;
        let soa = hickory_proto::rr::rdata::SOA::new(
            Name::from_ascii("ns.x.").unwrap(),
            Name::from_ascii("h.x.").unwrap(),
            1,
            2,
            3,
            4,
            rng.random_range(0..100),
        );
        m.add_authority(hickory_proto::rr::Record::from_rdata(
            Name::root(),
            rng.random_range(0..100),
            RData::SOA(soa),
        ));
    }
    if let Some(e) = q.edns {
        m.set_edns(e);
    }
    m.to_vec().ok()
}

/// `inputs` random, generated and mutated packets (seeded by `seed`) into both handlers,
/// over UDP and TCP, against a view with A, PTR and SRV records; forwarded queries also
/// go through the cache with (possibly mutated) upstream answers. Never a panic; every
/// reply parses, keeps the query id and respects the UDP size limit; a cached answer
/// parses whenever the stored one did. Returns the number of replies.
fn fuzz(inputs: u32, seed: u64) -> u32 {
    use crate::cache::Cache;
    let mut rng = StdRng::seed_from_u64(seed);
    let (h1, h2) = (handler(false), handler(true));
    let views = [view(), srv_view()];
    let cache = Cache::new(64);
    let t0 = std::time::Instant::now();
    let mut seeds: Vec<Vec<u8>> = vec![
        query("web", RecordType::A, None),
        query("tasks.web", RecordType::A, Some(1232)),
        query("many", RecordType::A, Some(700)),
        query("3.0.0.10.in-addr.arpa", RecordType::PTR, None),
        query("nothing.here", RecordType::AAAA, Some(4096)),
        query("_80._tcp.web", RecordType::SRV, None),
        query("_80._tcp.mid", RecordType::SRV, Some(512)),
        query("_80._tcp.lots", RecordType::ANY, Some(1400)),
    ];
    let mut out = Vec::new();
    let mut cached = Vec::new();
    let mut replies = 0;
    for i in 0..inputs {
        let packet: Vec<u8> = match i % 4 {
            0 => {
                let len = rng.random_range(0..600);
                (0..len).map(|_| rng.random::<u8>()).collect()
            }
            1 => random_query(&mut rng),
            _ => {
                let k = rng.random_range(0..seeds.len());
                let mut p = seeds[k].clone();
                let other = &seeds[rng.random_range(0..seeds.len())];
                mutate(&mut rng, &mut p, other);
                p
            }
        };
        let (h, t) = match i % 3 {
            0 => (&h1, Transport::Udp),
            1 => (&h2, Transport::Udp),
            _ => (&h2, Transport::Tcp),
        };
        let r = &views[(i as usize / 3) % 2];
        match h.handle(&packet, r, t, &mut out) {
            Outcome::Reply => {
                replies += 1;
                assert!(out.len() >= 12);
                assert_eq!(out[..2], packet[..2]);
                if t == Transport::Udp {
                    assert!(out.len() <= usize::from(MAX_UDP_PAYLOAD));
                }
                if let Err(e) = Message::from_vec(&out) {
                    panic!("reply does not parse ({e}): query {packet:02x?} reply {out:02x?}");
                }
            }
            Outcome::Forward => {
                let Some(key) = cache_key(&packet, t) else {
                    panic!("forwarded query without a cache key: {packet:02x?}");
                };
                // Building and parsing upstream answers costs more than handle(): only
                // every fourth forward goes through the cache.
                if i % 4 != 1 {
                    continue;
                }
                let now = t0 + std::time::Duration::from_millis(u64::from(i) * 3);
                if let Some(mut reply) = upstream_reply(&mut rng, &packet) {
                    if rng.random_bool(0.3) {
                        mutate(&mut rng, &mut reply, &packet);
                    }
                    // The shared cache (eviction, replacement): no panic, right id.
                    cache.insert(&key, &reply, now);
                    if cache.get(&key, &packet, now, &mut cached) {
                        assert_eq!(cached[..2], packet[..2]);
                        assert!(cached.len() <= key.limit);
                    }
                    // A fresh one: what comes out parses if what went in did.
                    let fresh = Cache::new(1);
                    fresh.insert(&key, &reply, now);
                    let later = now + std::time::Duration::from_millis(1500);
                    if fresh.get(&key, &packet, later, &mut cached)
                        && Message::from_vec(&reply).is_ok()
                        && let Err(e) = Message::from_vec(&cached)
                    {
                        panic!("cached answer does not parse ({e}): {reply:02x?} -> {cached:02x?}");
                    }
                }
            }
            Outcome::Ignore => {}
        }
        // Some replies become seeds too (responses exercise the silent path).
        if i % 5000 == 0 && !out.is_empty() && seeds.len() < 32 {
            seeds.push(out.clone());
        }
    }
    replies
}

fn fuzz_on_two_threads(inputs: u32) {
    let replies: Vec<u32> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..2u64)
            .map(|k| s.spawn(move || fuzz(inputs / 2, 0x5_0A1 + k)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let total: u32 = replies.iter().sum();
    assert!(total > inputs / 4, "too few replies: {total}");
}

/// 200,000 inputs (a few seconds in a debug build).
#[test]
fn fuzz_random_and_mutated_packets() {
    fuzz_on_two_threads(200_000);
}

/// A million inputs: about 25 s of a debug build on this 2-core machine when idle (over a
/// minute while other builds run), so run it in release (a few seconds):
/// `cargo test --release -p shoal-dns --lib fuzz_one_million -- --ignored`.
#[test]
#[ignore = "1M inputs; run in release"]
fn fuzz_one_million() {
    fuzz_on_two_threads(1_000_000);
}

/// Cost of the query path (run with `--release -- --ignored --nocapture`; `SHOAL_TIMING_N`
/// sets the iterations per shape).
#[test]
#[ignore = "timing; run in release"]
fn timing_local_answer() {
    let (h, r, srv) = (handler(true), view(), srv_view());
    for (what, q) in [
        ("A, no EDNS", query("tasks.web", RecordType::A, None)),
        ("A, EDNS", query("tasks.web", RecordType::A, Some(1232))),
        ("AAAA NODATA", query("web", RecordType::AAAA, None)),
        ("PTR", query("3.0.0.10.in-addr.arpa", RecordType::PTR, None)),
        (
            "SRV + additional",
            query("_80._tcp.web", RecordType::SRV, None),
        ),
    ] {
        let r = if what.starts_with("SRV") { &srv } else { &r };
        let mut out = Vec::with_capacity(512);
        // SHOAL_TIMING_N: fewer iterations (e.g. under callgrind, to count instructions).
        let n = std::env::var("SHOAL_TIMING_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(h.handle(std::hint::black_box(&q), r, Transport::Udp, &mut out));
        }
        let per = start.elapsed() / n;
        println!("handle() {what}: {per:?} per query");
    }
}

fn srv_view() -> Records {
    let mut b = Records::builder();
    b.a("web.1.abc", &[ip(3)], false)
        .a("web.2.abc", &[ip(4), ip(5)], false)
        .srv(
            "_80._tcp.web",
            &[
                ("web.1.abc".into(), 80),
                ("Web.2.abc.".into(), 8080),
                ("web.1.abc".into(), 81),
                ("unknown.host".into(), 80),
            ],
        )
        .a("web", &[ip(2)], false);
    // Answers that fit in 512 bytes only without their additional records, and answers
    // that do not fit at all.
    let hosts: Vec<(String, u16)> = (0..12)
        .map(|i| (format!("h{i:02}.some-long-name.x"), 80))
        .collect();
    for (name, _) in &hosts {
        b.a(name, &[ip(7), ip(8), ip(9)], false);
    }
    b.srv("_80._tcp.mid", &hosts);
    let lots: Vec<(String, u16)> = (0..40)
        .map(|i| (format!("h{i:02}.some-long-name.x"), 80))
        .collect();
    b.srv("_80._tcp.lots", &lots);
    b.build()
}

fn srv_answers(m: &Message) -> Vec<(String, u16, u16, u16, u32)> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.target.to_ascii(), s.port, s.priority, s.weight, r.ttl),
            other => panic!("not SRV: {other:?}"),
        })
        .collect()
}

#[test]
fn srv_answer_with_additional_a_records() {
    let (h, r) = (handler(true), srv_view());
    for t in [Transport::Udp, Transport::Tcp] {
        let m = ask(&h, &r, &query("_80._TCP.Web", RecordType::SRV, None), t);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && !m.metadata.truncation);
        assert_eq!(m.queries[0].name().to_ascii(), "_80._TCP.Web.");
        assert!(
            m.answers
                .iter()
                .all(|a| a.name.to_ascii() == "_80._TCP.Web.")
        );
        assert_eq!(
            srv_answers(&m),
            vec![
                ("web.1.abc.".to_string(), 80, 0, 1, 5),
                ("web.2.abc.".to_string(), 8080, 0, 1, 5),
                ("web.1.abc.".to_string(), 81, 0, 1, 5),
                ("unknown.host.".to_string(), 80, 0, 1, 5),
            ]
        );
        // Each known target's A records once; unknown targets have none.
        let add: Vec<(String, Ipv4Addr, u32)> = m
            .additionals
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => (r.name.to_ascii(), a.0, r.ttl),
                other => panic!("not A: {other:?}"),
            })
            .collect();
        assert_eq!(
            add,
            vec![
                ("web.1.abc.".to_string(), ip(3), 5),
                ("web.2.abc.".to_string(), ip(4), 5),
                ("web.2.abc.".to_string(), ip(5), 5),
            ]
        );
        assert!(m.authorities.is_empty());
    }
    // With EDNS: the OPT comes after the additional A records.
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.web", RecordType::SRV, Some(1232)),
        Transport::Udp,
    );
    assert_eq!((m.answers.len(), m.additionals.len()), (4, 3));
    assert!(m.edns.is_some());
    // ANY: A and SRV.
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.web", RecordType::ANY, None),
        Transport::Udp,
    );
    assert_eq!(m.answers.len(), 4);
}

#[test]
fn srv_nodata_and_unknown() {
    let r = srv_view();
    // SRV for a name with only A records, A for a name with only SRV: NODATA + SOA.
    for (name, rtype) in [("web", RecordType::SRV), ("_80._tcp.web", RecordType::A)] {
        let m = ask(
            &handler(true),
            &r,
            &query(name, rtype, None),
            Transport::Udp,
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty() && m.additionals.is_empty());
        assert_eq!(soa_of(&m).1, 7);
    }
    // Unknown: forwarded, or NXDOMAIN.
    let q = query("_53._udp.nothing", RecordType::SRV, None);
    let mut out = Vec::new();
    assert_eq!(
        handler(true).handle(&q, &r, Transport::Udp, &mut out),
        Outcome::Forward
    );
    let m = ask(&handler(false), &r, &q, Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn srv_truncation_drops_additional_first() {
    let (h, r) = (handler(false), srv_view());
    // 12 SRV records fit in 512 bytes; their 36 A records do not: dropped, no TC.
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.mid", RecordType::SRV, None),
        Transport::Udp,
    );
    assert!(!m.metadata.truncation);
    assert_eq!((m.answers.len(), m.additionals.len()), (12, 0));
    // With a large enough EDNS buffer, or over TCP, all of it.
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.mid", RecordType::SRV, Some(4096)),
        Transport::Udp,
    );
    assert_eq!((m.answers.len(), m.additionals.len()), (12, 36));
    assert!(m.edns.is_some());
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.mid", RecordType::SRV, None),
        Transport::Tcp,
    );
    assert_eq!((m.answers.len(), m.additionals.len()), (12, 36));
    // 40 SRV records do not fit in 512: TC, the SRV records that fit, no additional.
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.lots", RecordType::SRV, None),
        Transport::Udp,
    );
    assert!(m.metadata.truncation);
    assert_eq!((m.answers.len(), m.additionals.len()), (12, 0));
    let m = ask(
        &h,
        &r,
        &query("_80._tcp.lots", RecordType::SRV, None),
        Transport::Tcp,
    );
    assert_eq!((m.answers.len(), m.additionals.len()), (40, 36));
}

/// Issue 16: a UDP answer too large for the client carries as many whole records as fit
/// (TC set), as Docker's resolver does, not the question alone: musl before 1.2.4 never
/// retries over TCP and took an empty truncated answer for "no such name".
#[test]
fn truncated_udp_answer_carries_whole_records() {
    let h = handler(false);
    let big: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(10, 2, 0, i)).collect();
    let r = Records::builder()
        .a("tasks.big", &big, true)
        .a("ordered", &big, false)
        .build();
    // Header 12, question (name + 2, type, class), A record 16 (pointer, type, class,
    // TTL, length, address), OPT 11.
    let question = |name: &str| name.len() + 2 + 4;
    let fit = |name: &str, limit: usize, opt: usize| (limit - 12 - question(name) - opt) / A_RR_LEN;
    assert_eq!(fit("tasks.big", 512, 0), 30);
    assert_eq!(fit("tasks.big", 600, 11), 35);
    assert_eq!(fit("ordered", 512, 0), 30);
    for (edns, limit, opt) in [(None, 512, 0), (Some(600), 600, 11)] {
        for name in ["tasks.big", "ordered"] {
            let q = query(name, RecordType::A, edns);
            let bytes = handle_to_vec(&h, &q, &r, Transport::Udp).unwrap();
            let m = Message::from_vec(&bytes).expect("truncated answer parses");
            assert!(m.metadata.truncation, "{name} {edns:?}");
            assert!(m.metadata.authoritative);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            let n = fit(name, limit, opt);
            assert_eq!(m.answers.len(), n, "{name} {edns:?}");
            // Whole records only: the message is exactly header, question, n records and
            // the OPT, nothing cut in the middle.
            let whole = 12 + question(name) + n * A_RR_LEN + opt;
            assert_eq!(bytes.len(), whole, "{name} {edns:?}");
            assert!(bytes.len() <= limit);
            assert!(m.authorities.is_empty());
            assert_eq!(m.edns.is_some(), edns.is_some());
            for rec in &m.answers {
                assert_eq!((rec.name.to_ascii(), rec.ttl), (format!("{name}."), 5));
            }
            let got = a_answers(&m);
            let distinct: std::collections::HashSet<_> = got.iter().collect();
            assert_eq!(distinct.len(), n, "{got:?}");
            assert!(got.iter().all(|a| big.contains(a)));
            if name == "ordered" {
                // Not shuffled: the first n of the full answer.
                assert_eq!(got, big[..n]);
            }
        }
    }
    // Shuffled before it is cut: over many answers every address gets its turn, in
    // varying order.
    let mut seen = std::collections::HashSet::new();
    let mut orders = std::collections::HashSet::new();
    for _ in 0..100 {
        let m = ask(
            &h,
            &r,
            &query("tasks.big", RecordType::A, None),
            Transport::Udp,
        );
        let got = a_answers(&m);
        seen.extend(got.iter().copied());
        orders.insert(got);
    }
    assert_eq!(seen.len(), 40);
    assert!(orders.len() > 90, "{}", orders.len());
    // TCP: everything, no TC.
    let m = ask(
        &h,
        &r,
        &query("tasks.big", RecordType::A, None),
        Transport::Tcp,
    );
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    // Variable-size records (SRV): whole ones too. Question "_80._tcp.lots" 15 + 4;
    // each SRV record 12 + 6 + 22 (target h00.some-long-name.x).
    let r = srv_view();
    let q = query("_80._tcp.lots", RecordType::SRV, None);
    let bytes = handle_to_vec(&h, &q, &r, Transport::Udp).unwrap();
    let m = Message::from_vec(&bytes).unwrap();
    let n = (512 - 12 - 19) / 40;
    assert!(m.metadata.truncation);
    assert_eq!((m.answers.len(), m.additionals.len()), (n, 0));
    assert_eq!(bytes.len(), 12 + 19 + n * 40);
    let targets: Vec<String> = srv_answers(&m).into_iter().map(|s| s.0).collect();
    let expected: Vec<String> = (0..n)
        .map(|i| format!("h{i:02}.some-long-name.x."))
        .collect();
    assert_eq!(targets, expected);
}

/// Issue 16: RD is defined only for QUERY (RFC 1035 4.1.1); a NOTIMP answer to another
/// opcode echoes the opcode and the id but not RD (nor any other QUERY-only bit).
#[test]
fn notimp_for_other_opcodes_clears_rd() {
    let (h, r) = (handler(true), view());
    let good = query("web", RecordType::A, None);
    assert_eq!(good[2] & 0x01, 1, "the query has RD");
    for op in 1..=15u8 {
        let mut q = good.clone();
        // QR=0, opcode, AA, TC and RD set; RA, Z, AD and CD set too.
        q[2] = (op << 3) | 0x07;
        q[3] = 0xF0;
        let bytes = handle_to_vec(&h, &q, &r, Transport::Udp).expect("a reply");
        assert_eq!(bytes.len(), 12, "header only: {bytes:02x?}");
        assert_eq!(bytes[..2], q[..2]);
        // QR=1, the opcode echoed, AA, TC and RD clear; RA, Z, AD, CD clear, NOTIMP.
        assert_eq!(bytes[2], 0x80 | (op << 3), "opcode {op}: {:08b}", bytes[2]);
        assert_eq!(bytes[3], RCODE_NOTIMP, "opcode {op}: {:08b}", bytes[3]);
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
        assert!(!m.metadata.recursion_desired);
        assert_eq!(u8::from(m.metadata.op_code), op);
    }
    // QUERY keeps echoing RD, in errors too (FORMERR: two questions).
    let mut q = good.clone();
    q[5] = 2;
    let bytes = handle_to_vec(&h, &q, &r, Transport::Udp).unwrap();
    assert_eq!((bytes[2], bytes[3]), (0x81, RCODE_FORMERR));
}

fn soa_rdata(rec: &hickory_proto::rr::Record) -> hickory_proto::rr::rdata::SOA {
    match &rec.data {
        RData::SOA(soa) => soa.clone(),
        other => panic!("not SOA: {other:?}"),
    }
}

/// Issue 16: one zone model for every answer. The resolver is authoritative for one zone
/// whose apex is the root: every name of the view (service, `tasks.`, task, alias and
/// reverse names) is in it, every negative answer carries that apex's SOA, an SOA query for
/// the root answers it, and an SOA query for any other name is NODATA (no name but the apex
/// has an SOA). Without forwarding the zone is the whole namespace: the apex and the empty
/// non-terminals above the view's names exist (NODATA), other names do not (NXDOMAIN).
/// With forwarding, names outside the view (including those empty non-terminals) and the
/// root's other types go upstream; only the root's SOA stays ours.
#[test]
fn one_zone_at_the_root() {
    let r = Records::builder()
        .a("web", &[ip(2)], false)
        .a("tasks.web", &[ip(3)], true)
        .a("web.1.abc", &[ip(3)], false)
        .ptr(ip(3), "web.1.abc")
        .build();
    let local = Records::builder()
        .a("web.1.abc", &[ip(3)], false)
        .ptr(ip(3), "web.1.abc")
        .forward(false)
        .build();
    let h = handler(false);
    let q = |name: &str, t| query(name, t, None);

    // The apex answers its SOA; TTL and MINIMUM are the negative TTL.
    let m = ask(&h, &r, &q(".", RecordType::SOA), Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(m.answers.len(), 1);
    assert!(m.authorities.is_empty());
    let apex = m.answers[0].clone();
    assert_eq!((apex.name.to_ascii().as_str(), apex.ttl), (".", 7));
    let soa = soa_rdata(&apex);
    assert_eq!(soa.mname.to_ascii(), "ns.shoal.internal.");
    assert_eq!(soa.rname.to_ascii(), "hostmaster.shoal.internal.");
    assert_eq!(
        (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum),
        (1, 3600, 600, 86400, 7)
    );
    // ANY at the apex: its only record.
    let m = ask(&h, &r, &q(".", RecordType::ANY), Transport::Udp);
    assert_eq!(m.answers, vec![apex.clone()]);

    // Every negative answer carries exactly that record in AUTHORITY: NODATA for names
    // that exist (SOA for a service name included: it is not an apex), NXDOMAIN for
    // names that do not.
    for (name, t, rcode) in [
        ("web", RecordType::SOA, ResponseCode::NoError),
        ("tasks.web", RecordType::SOA, ResponseCode::NoError),
        ("web", RecordType::AAAA, ResponseCode::NoError),
        (
            "3.0.0.10.in-addr.arpa",
            RecordType::SOA,
            ResponseCode::NoError,
        ),
        (".", RecordType::NS, ResponseCode::NoError),
        (".", RecordType::A, ResponseCode::NoError),
        // Empty non-terminals above web.1.abc and 3.0.0.10.in-addr.arpa (RFC 8020: an
        // NXDOMAIN there would deny the names below).
        ("abc", RecordType::A, ResponseCode::NoError),
        ("1.abc", RecordType::SOA, ResponseCode::NoError),
        (
            "0.0.10.in-addr.arpa",
            RecordType::PTR,
            ResponseCode::NoError,
        ),
        ("in-addr.arpa", RecordType::NS, ResponseCode::NoError),
        ("arpa", RecordType::SOA, ResponseCode::NoError),
        ("nosuch", RecordType::A, ResponseCode::NXDomain),
        ("nosuch", RecordType::SOA, ResponseCode::NXDomain),
        ("x.web", RecordType::A, ResponseCode::NXDomain),
        ("x.abc", RecordType::A, ResponseCode::NXDomain),
        ("example.com", RecordType::SOA, ResponseCode::NXDomain),
        (
            "9.0.0.10.in-addr.arpa",
            RecordType::PTR,
            ResponseCode::NXDomain,
        ),
    ] {
        let m = ask(&h, &r, &q(name, t), Transport::Udp);
        assert_eq!(m.metadata.response_code, rcode, "{name} {t}");
        assert!(m.metadata.authoritative, "{name} {t}");
        assert!(m.answers.is_empty(), "{name} {t}");
        assert_eq!(m.authorities, vec![apex.clone()], "{name} {t}");
    }

    // With upstreams and a view that may forward: names of the view are still answered
    // here (NODATA with the same SOA), the root's SOA too; anything else is forwarded,
    // the root's other types included (`dig +trace` asks for `. NS`, validators for
    // `. DNSKEY`), and so are the empty non-terminals (an alias `db.example.com` must not
    // hide `example.com`).
    let hf = handler(true);
    let m = ask(&hf, &r, &q("web", RecordType::SOA), Transport::Udp);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.authorities, vec![apex.clone()]);
    let m = ask(&hf, &r, &q(".", RecordType::SOA), Transport::Udp);
    assert_eq!(m.answers, vec![apex.clone()]);
    assert!(m.metadata.recursion_available);
    let mut out = Vec::new();
    for (name, t) in [
        (".", RecordType::NS),
        (".", RecordType::ANY),
        (".", RecordType::DNSKEY),
        ("abc", RecordType::A),
        ("arpa", RecordType::NS),
        ("nosuch", RecordType::SOA),
    ] {
        assert_eq!(
            hf.handle(&q(name, t), &r, Transport::Udp, &mut out),
            Outcome::Forward,
            "{name} {t}"
        );
    }
    // A view that never forwards: the whole namespace is the zone even with upstreams.
    for (name, t, rcode) in [
        (".", RecordType::NS, ResponseCode::NoError),
        ("abc", RecordType::A, ResponseCode::NoError),
        ("example.com", RecordType::A, ResponseCode::NXDomain),
    ] {
        let m = ask(&hf, &local, &q(name, t), Transport::Udp);
        assert_eq!(m.metadata.response_code, rcode, "{name} {t}");
        assert_eq!(m.authorities, vec![apex.clone()], "{name} {t}");
        assert!(!m.metadata.recursion_available);
    }
    // Over TCP and with EDNS alike.
    let m = ask(
        &h,
        &r,
        &query(".", RecordType::SOA, Some(1232)),
        Transport::Tcp,
    );
    assert_eq!(m.answers, vec![apex]);
    assert!(m.edns.is_some());
}
