//! Golden-text tests of the rendered nft script and tests of the packet tracer.
//!
//! The expected scripts live in `tests/golden/<name>.nft`. After an intended change, rewrite
//! them with `SHOAL_UPDATE_GOLDEN=1 cargo test -p shoal-lb --test render` and review the diff.

mod common;

use std::path::PathBuf;

use common::fixtures::{self, ip};
use shoal_lb::{
    Dispatch, HASH_SLOTS, LbError, Model, Packet, Protocol, Ruleset, Selection, Trace, render,
    trace, validate,
};

fn golden(name: &str, rs: &Ruleset) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.nft"));
    let got = render(rs);
    if std::env::var_os("SHOAL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(got, want, "render({name}) differs from {}", path.display());
}

#[test]
fn golden_one_service_three_backends() {
    golden("one_service", &fixtures::one_service());
}

#[test]
fn golden_zero_backends() {
    golden("zero_backends", &fixtures::zero_backends());
}

#[test]
fn golden_several_services_sorted() {
    golden("several", &fixtures::several());
}

#[test]
fn golden_hairpin_set() {
    golden("hairpin", &fixtures::hairpin());
}

#[test]
fn golden_any_port() {
    golden("any_port", &fixtures::any_port());
}

#[test]
fn any_port_keeps_the_destination_port_and_specific_ports_win() {
    let rs = fixtures::any_port();
    let pkt = |dst: &str, protocol, dport| Packet {
        src: ip("10.0.9.9"),
        dst: ip(dst),
        protocol,
        dport,
    };
    assert_eq!(
        trace(&rs, &pkt("10.96.0.10", Protocol::Tcp, 5432)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.1.1"), 5432), (ip("10.0.1.2"), 5432)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.96.0.10", Protocol::Udp, 53)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.1.1"), 53), (ip("10.0.1.2"), 53)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.96.0.10", Protocol::Tcp, 443)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.1.3"), 8443)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.96.0.11", Protocol::Tcp, 80)),
        Trace::Reject
    );
    let mut bad = rs.clone();
    bad.services[0].target_port = 80;
    assert!(matches!(validate(&bad), Err(LbError::Invalid(m)) if m.contains("both or neither")));
}

#[test]
fn render_is_independent_of_input_order() {
    for (name, rs) in fixtures::all() {
        let mut shuffled = rs.clone();
        shuffled.vips.reverse();
        shuffled.services.reverse();
        shuffled.local_endpoints.reverse();
        for s in &mut shuffled.services {
            s.backends.reverse();
        }
        assert_eq!(render(&rs), render(&shuffled), "{name}");
    }
}

#[test]
fn render_is_one_replace_transaction() {
    let text = render(&fixtures::one_service());
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("table ip shoal_lb {}"));
    assert_eq!(lines.next(), Some("delete table ip shoal_lb"));
    assert_eq!(lines.next(), Some("table ip shoal_lb {"));
    // Exactly one table definition follows, nothing else at top level.
    let top_level: Vec<_> = text.lines().filter(|l| !l.starts_with('\t')).collect();
    assert_eq!(
        top_level,
        [
            "table ip shoal_lb {}",
            "delete table ip shoal_lb",
            "table ip shoal_lb {",
            "}"
        ]
    );
}

fn pkt(src: &str, dst: &str, protocol: Protocol, dport: u16) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        protocol,
        dport,
    }
}

#[test]
fn trace_service_port_is_dnated_to_all_backends() {
    let rs = fixtures::one_service();
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 80)),
        Trace::Dnat {
            candidates: vec![
                (ip("10.0.1.1"), 8080),
                (ip("10.0.1.2"), 8080),
                (ip("10.0.1.3"), 8080)
            ],
            masquerade_if_hairpin: false,
        }
    );
}

#[test]
fn trace_other_ports_and_protocols_of_a_vip_are_rejected() {
    let rs = fixtures::one_service();
    for p in [
        pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 81),
        pkt("10.0.9.9", "10.96.0.10", Protocol::Udp, 80),
        pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 8080),
    ] {
        assert_eq!(trace(&rs, &p), Trace::Reject, "{p:?}");
    }
}

#[test]
fn trace_non_vip_traffic_is_untouched() {
    let rs = fixtures::one_service();
    // Straight to a backend, and to another address on the service port.
    for p in [
        pkt("10.0.9.9", "10.0.1.1", Protocol::Tcp, 8080),
        pkt("10.0.9.9", "10.96.0.11", Protocol::Tcp, 80),
    ] {
        assert_eq!(trace(&rs, &p), Trace::NotVip, "{p:?}");
    }
}

#[test]
fn trace_zero_backends_rejects_and_portless_vip_rejects() {
    let rs = fixtures::zero_backends();
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.11", Protocol::Tcp, 80)),
        Trace::Reject
    );
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.12", Protocol::Udp, 53)),
        Trace::Reject
    );
}

#[test]
fn trace_several_services() {
    let rs = fixtures::several();
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.20", Protocol::Udp, 53)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.1.7"), 5353)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 80)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.1.1"), 8080), (ip("10.0.1.2"), 8080)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.30", Protocol::Tcp, 80)),
        Trace::Dnat {
            candidates: vec![(ip("10.0.2.1"), 80)],
            masquerade_if_hairpin: false
        }
    );
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.30", Protocol::Udp, 80)),
        Trace::Reject
    );
}

#[test]
fn trace_hairpin_only_for_local_endpoints_that_are_backends() {
    let rs = fixtures::hairpin();
    let dnat = |src: &str| trace(&rs, &pkt(src, "10.96.0.10", Protocol::Tcp, 80));
    let masq = |t: Trace| match t {
        Trace::Dnat {
            masquerade_if_hairpin,
            ..
        } => masquerade_if_hairpin,
        other => panic!("expected dnat, got {other:?}"),
    };
    // Local task and backend: masqueraded when it picks itself.
    assert!(masq(dnat("10.0.1.1")));
    assert!(masq(dnat("10.0.1.2")));
    // A backend on another node is not in this node's hairpin set; nor is a mere client.
    assert!(!masq(dnat("10.0.2.9")));
    assert!(!masq(dnat("10.0.9.9")));
}

#[test]
fn validate_rejects_unsafe_names_and_duplicates() {
    let mut rs = fixtures::one_service();
    assert!(validate(&rs).is_ok());
    rs.table = "lb; flush ruleset".into();
    assert!(matches!(validate(&rs), Err(LbError::Invalid(_))));

    let mut rs = fixtures::one_service();
    rs.services[0].id = "Web-1".into();
    assert!(matches!(validate(&rs), Err(LbError::Invalid(_))));

    let mut rs = fixtures::one_service();
    let mut dup = rs.services[0].clone();
    dup.id = "other".into();
    rs.services.push(dup);
    let err = validate(&rs).unwrap_err().to_string();
    assert!(err.contains("both claim 10.96.0.10:80/tcp"), "{err}");

    // One id on two VIPs is fine: ids no longer name chains.
    let mut rs = fixtures::one_service();
    let mut same_id = rs.services[0].clone();
    same_id.vip = ip("10.96.0.99");
    rs.services.push(same_id);
    assert!(validate(&rs).is_ok());

    let mut rs = fixtures::one_service();
    rs.services[0].affinity = Some(0);
    let err = validate(&rs).unwrap_err().to_string();
    assert!(
        err.contains("affinity timeout 0 s must be 1-86400"),
        "{err}"
    );
}

fn golden_text(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.nft"));
    if std::env::var_os("SHOAL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(got, want, "{name} differs from {}", path.display());
}

#[test]
fn golden_affinity_and_draining() {
    golden("affinity_draining", &fixtures::affinity_draining());
}

#[test]
fn diff_of_equal_models_is_nothing() {
    let m = Model::from_ruleset(&fixtures::several());
    assert_eq!(m.diff(&m.clone()), None);
}

#[test]
fn golden_diff_one_backend_added() {
    let before = fixtures::one_service();
    let mut after = before.clone();
    after.services[0].backends.push(ip("10.0.1.4"));
    let d = Model::from_ruleset(&before)
        .diff(&Model::from_ruleset(&after))
        .unwrap();
    golden_text("diff_add_backend", &d);
}

#[test]
fn golden_diff_service_removed_and_chains_collected() {
    let before = fixtures::affinity_draining();
    let mut after = before.clone();
    after.services.retain(|s| s.affinity.is_none());
    let d = Model::from_ruleset(&before)
        .diff(&Model::from_ruleset(&after))
        .unwrap();
    golden_text("diff_remove_affinity_service", &d);
}

/// A backend change touches the elements of its service only: the update is the same size
/// with 10 or 5,000 services.
#[test]
fn diff_cost_does_not_grow_with_the_number_of_services() {
    let sizes: Vec<(usize, usize)> = [10u32, 5_000]
        .into_iter()
        .map(|n| {
            let before = fixtures::many(n, 10, 96);
            let mut after = before.clone();
            after.services[3].backends.pop();
            let d = Model::from_ruleset(&before)
                .diff(&Model::from_ruleset(&after))
                .unwrap();
            (d.lines().count(), d.len())
        })
        .collect();
    assert_eq!(sizes[0].0, sizes[1].0, "lines: {sizes:?}");
    // Addresses of the bigger table are a few characters longer at most.
    assert!(sizes[1].1 < sizes[0].1 + 64, "bytes: {sizes:?}");
}

#[test]
fn consistent_services_fill_every_slot_and_trace_to_all_backends() {
    let mut rs = fixtures::one_service();
    rs.services[0].selection = Selection::Consistent;
    let m = Model::from_ruleset(&rs);
    assert_eq!(m.backends.len(), HASH_SLOTS as usize);
    assert_eq!(
        m.services.values().next(),
        Some(&Dispatch::Chain(format!("hash_tcp_{HASH_SLOTS}")))
    );
    match trace(&rs, &pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 80)) {
        Trace::Dnat { candidates, .. } => assert_eq!(candidates.len(), 3),
        other => panic!("expected dnat, got {other:?}"),
    }
}

#[test]
fn draining_backends_get_no_new_flows_and_all_draining_rejects() {
    let mut rs = fixtures::one_service();
    rs.services[0].draining = vec![ip("10.0.1.1")];
    match trace(&rs, &pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 80)) {
        Trace::Dnat { candidates, .. } => assert_eq!(
            candidates,
            vec![(ip("10.0.1.2"), 8080), (ip("10.0.1.3"), 8080)]
        ),
        other => panic!("expected dnat, got {other:?}"),
    }
    rs.services[0].draining = rs.services[0].backends.clone();
    assert_eq!(
        trace(&rs, &pkt("10.0.9.9", "10.96.0.10", Protocol::Tcp, 80)),
        Trace::Reject
    );
}
