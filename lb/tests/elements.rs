//! Kernel tests of the element load over nfnetlink ([`load_elements`]): a table made of
//! `render_structure` (through nft) plus the elements sent as one nfnetlink batch must list
//! exactly like the same ruleset applied whole through nft, for every fixture; the Syncer's
//! first sync takes that path; refusals name the map.
//!
//! They need root and `nft`, and FAIL (never skip) without them. Namespaces are named
//! `shoal-t-lb-<pid>-<n>` and deleted by Drop guards, also on panic.

mod common;

use std::process::Command;

use common::fixtures::{self, TABLE, ip, svc};
use common::netlab::{NsGuard, block_on, require_root_and_nft};
use shoal_lb::{
    Applier, LbError, Model, Protocol, Ruleset, Selection, SyncKind, Syncer, VirtualService, apply,
    delete_table, list_table, load_elements,
};

fn listing(ns: &str) -> String {
    block_on(list_table(ns, TABLE))
        .unwrap()
        .expect("table exists")
}

/// The listing as a sorted multiset of tokens: nft lists elements in the set's internal
/// order and packs several on a line, which differ between two loads of the same elements.
/// Every element, declaration line and rule is one token.
fn tokens(text: &str) -> Vec<String> {
    let mut t: Vec<String> = text
        .split([',', '\n', '{', '}'])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    t.sort();
    t
}

/// The two listings hold the same tokens; on failure, names only the tokens that differ
/// (a whole listing is thousands of them).
#[track_caller]
fn assert_same_listing(got: &str, want: &str) {
    let (a, b) = (tokens(got), tokens(want));
    if a == b {
        return;
    }
    let mut extra = a.clone();
    for t in &b {
        if let Some(i) = extra.iter().position(|x| x == t) {
            extra.remove(i);
        }
    }
    let mut missing = b.clone();
    for t in &a {
        if let Some(i) = missing.iter().position(|x| x == t) {
            missing.remove(i);
        }
    }
    panic!("listings differ: extra {extra:?}, missing {missing:?}");
}

/// Structure through nft, elements over nfnetlink.
fn load_fast(ns: &str, rs: &Ruleset) -> shoal_lb::ElementLoad {
    let m = Model::from_ruleset(rs);
    block_on(Applier::auto().apply_script(ns, &m.render_structure()))
        .unwrap_or_else(|e| panic!("structure: {e}"));
    block_on(load_elements(ns, &m)).unwrap_or_else(|e| panic!("elements: {e}"))
}

/// Every map and set non-empty: consistent hashing (port and any-port), random beyond the
/// permanent chains, affinity on a port and on every port (TCP and UDP), services and
/// any-port services without backends, draining backends, hairpin endpoints, a bare VIP.
fn mixed() -> Ruleset {
    let mut hash = svc(
        "hash",
        "10.96.0.10",
        Protocol::Tcp,
        80,
        8080,
        &["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"],
    );
    hash.selection = Selection::Consistent;
    let mut hash_any = svc(
        "hash_any",
        "10.96.0.11",
        Protocol::Udp,
        0,
        0,
        &["10.0.2.1", "10.0.2.2", "10.0.2.3"],
    );
    hash_any.selection = Selection::Consistent;
    let mut aff = svc(
        "aff",
        "10.96.0.10",
        Protocol::Tcp,
        443,
        8443,
        &["10.0.1.1", "10.0.1.2", "10.0.1.3"],
    );
    aff.affinity = Some(600);
    aff.draining = vec![ip("10.0.1.3")];
    let mut aff_udp = svc(
        "aff_udp",
        "10.96.0.12",
        Protocol::Udp,
        53,
        5353,
        &["10.0.3.1", "10.0.3.2"],
    );
    aff_udp.affinity = Some(30);
    let mut aff_any = svc(
        "aff_any",
        "10.96.0.13",
        Protocol::Tcp,
        0,
        0,
        &["10.0.4.1", "10.0.4.2"],
    );
    aff_any.affinity = Some(10_800);
    let big_backends: Vec<String> = (1..=40).map(|i| format!("10.0.5.{i}")).collect();
    let big_refs: Vec<&str> = big_backends.iter().map(String::as_str).collect();
    let big = svc("big", "10.96.0.14", Protocol::Tcp, 80, 80, &big_refs);
    let rnd_udp = svc(
        "rnd_udp",
        "10.96.0.14",
        Protocol::Udp,
        80,
        80,
        &["10.0.6.1", "10.0.6.2"],
    );
    let empty = svc("empty", "10.96.0.10", Protocol::Tcp, 8000, 8000, &[]);
    let empty_any = svc("empty_any", "10.96.0.15", Protocol::Udp, 0, 0, &[]);
    let mut all_draining = svc(
        "drained",
        "10.96.0.16",
        Protocol::Tcp,
        80,
        80,
        &["10.0.7.1"],
    );
    all_draining.draining = vec![ip("10.0.7.1")];
    Ruleset {
        table: TABLE.to_string(),
        vips: vec![ip("10.96.0.99"), ip("10.96.0.10")],
        services: vec![
            hash,
            hash_any,
            aff,
            aff_udp,
            aff_any,
            big,
            rnd_udp,
            empty,
            empty_any,
            all_draining,
        ],
        local_endpoints: vec![ip("10.0.1.1"), ip("10.0.4.2")],
    }
}

/// The mixed ruleset really exercises every map and set, and a non-permanent chain.
#[test]
fn mixed_ruleset_fills_every_map() {
    let m = Model::from_ruleset(&mixed());
    for p in [Protocol::Tcp, Protocol::Udp] {
        assert!(m.backends.keys().any(|k| k.1 == p), "backends_{p}");
        assert!(m.target_ports.keys().any(|k| k.1 == p), "target_ports_{p}");
    }
    assert!(!m.vips.is_empty() && !m.hairpin.is_empty());
    assert!(!m.services.is_empty() && !m.any_port.is_empty());
    assert!(!m.any_backends.is_empty() && !m.affinity_services.is_empty());
    assert!(m.chains.contains("rnd_tcp_40"), "{:?}", m.chains);
}

fn cases() -> Vec<(&'static str, Ruleset)> {
    let mut all = fixtures::all();
    all.push(("many_1000x10", fixtures::many(1000, 10, 96)));
    all.push(("mixed", mixed()));
    all
}

/// For every fixture: structure + netlink elements list exactly like one nft transaction.
#[test]
fn netlink_elements_list_like_nft() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let fast = guard.create();
    let slow = guard.create();
    for (name, rs) in cases() {
        let load = load_fast(&fast, &rs);
        block_on(apply(&slow, &rs)).unwrap_or_else(|e| panic!("{name}: nft: {e}"));
        let (a, b) = (listing(&fast), listing(&slow));
        assert_eq!(tokens(&a), tokens(&b), "{name}:\n{a}\n---- nft:\n{b}");
        assert!(load.elements > 0, "{name}: {load:?}");
        if name == "many_1000x10" {
            assert_eq!(load.elements, 1000 + 1000 + 10_000, "{load:?}");
            assert!(load.messages > 5, "{load:?}");
        }
        block_on(delete_table(&fast, TABLE)).unwrap();
        block_on(delete_table(&slow, TABLE)).unwrap();
    }
}

/// A first sync into a namespace without the table takes the netlink path (no fallback),
/// lists like nft, and later incremental updates work on the table it made.
#[test]
fn first_sync_loads_elements_over_netlink() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let full = guard.create();
    let mut s = Syncer::new(Applier::auto());
    let mut rs = mixed();
    let r = block_on(s.sync(&ns, &rs)).unwrap();
    assert_eq!((r.kind, r.adopted), (SyncKind::Full, false));
    assert_eq!(r.fallback, None, "{r:?}");
    block_on(apply(&full, &rs)).unwrap();
    assert_same_listing(&listing(&ns), &listing(&full));

    rs.services[0].backends.pop();
    rs.services.push(VirtualService {
        id: "late".into(),
        vip: ip("10.96.0.17"),
        port: 80,
        target_port: 80,
        backends: vec![ip("10.0.8.1")],
        ..Default::default()
    });
    let r = block_on(s.sync(&ns, &rs)).unwrap();
    assert_eq!(r.kind, SyncKind::Incremental, "{r:?}");
    block_on(apply(&full, &rs)).unwrap();
    assert_same_listing(&listing(&ns), &listing(&full));

    // A restarted agent adopts the netlink-loaded table: nothing to change.
    let r = block_on(Syncer::new(Applier::auto()).sync(&ns, &rs)).unwrap();
    assert_eq!((r.kind, r.adopted), (SyncKind::Unchanged, true), "{r:?}");
}

/// A table of another layout is still replaced in one nft transaction, not in two steps.
#[test]
fn foreign_table_is_replaced_through_nft() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let full = guard.create();
    let foreign = format!(
        "table ip {TABLE} {{\n\tset vips {{\n\t\ttype ipv4_addr\n\t\telements = {{ 10.96.9.9 }}\n\t}}\n}}\n"
    );
    block_on(Applier::auto().apply_script(&ns, &foreign)).unwrap();
    let rs = fixtures::several();
    let r = block_on(Syncer::new(Applier::auto()).sync(&ns, &rs)).unwrap();
    assert_eq!(
        (r.kind, r.adopted, r.fallback),
        (SyncKind::Full, false, None)
    );
    block_on(apply(&full, &rs)).unwrap();
    assert_same_listing(&listing(&ns), &listing(&full));
}

fn nft_in(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "nft {args:?}: {out:?}");
}

/// Elements for a map the table does not have: the kernel's ENOENT, naming the map, and
/// nothing of the batch is applied (one transaction).
#[test]
fn missing_map_is_named_and_nothing_is_loaded() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    // No UDP affinity here, so no chain refers to `target_ports_udp` and it can go.
    let rs = fixtures::affinity_draining();
    let mut m = Model::from_ruleset(&rs);
    assert!(!m.target_ports.keys().any(|k| k.1 == Protocol::Udp));
    block_on(Applier::auto().apply_script(&ns, &m.render_structure())).unwrap();
    nft_in(&ns, &["delete", "map", "ip", TABLE, "target_ports_udp"]);
    m.target_ports
        .insert((ip("10.96.0.20"), Protocol::Udp, 53), 5353);

    let err = block_on(load_elements(&ns, &m)).unwrap_err();
    let text = err.to_string();
    match &err {
        LbError::Elements { map, source, .. } => {
            assert_eq!(map.as_deref(), Some("target_ports_udp"), "{text}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{text}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(text.contains("\"target_ports_udp\""), "{text}");
    assert!(text.contains(&ns), "{text}");
    // The other maps' elements were in the same batch: none of them is there.
    let l = listing(&ns);
    assert!(!l.contains("elements"), "partial load:\n{l}");
}

/// No table at all: the first map of the batch is named.
#[test]
fn missing_table_is_an_error_naming_a_map() {
    require_root_and_nft();
    let mut guard = NsGuard::default();
    let ns = guard.create();
    let m = Model::from_ruleset(&fixtures::one_service());
    let err = block_on(load_elements(&ns, &m)).unwrap_err();
    match &err {
        LbError::Elements { map, source, .. } => {
            assert_eq!(map.as_deref(), Some("vips"), "{err}");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{err}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(block_on(list_table(&ns, TABLE)).unwrap(), None);
}

/// A namespace that does not exist: the netns error, no panic.
#[test]
fn missing_namespace_is_an_error() {
    let m = Model::from_ruleset(&fixtures::one_service());
    let ns = format!("shoal-t-lb-{}-absent", std::process::id());
    assert!(matches!(
        block_on(load_elements(&ns, &m)),
        Err(LbError::Netns(_))
    ));
}
