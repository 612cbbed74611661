//! Where a first load's time goes: the structure through nft (in-process libnftables), the
//! elements over nfnetlink ([`load_elements`]: encoding plus the kernel's transaction), and,
//! for comparison, the whole table through nft in one transaction.
//!
//! `cargo run --release -p shoal-lb --example element_load_cost [-- ROUNDS]` as root. Each
//! load goes into a fresh namespace `shoal-t-lbx-<pid>-<n>` (deleted afterwards, also on
//! panic); prints medians of ROUNDS (default 3) for 1,000 and 10,000 services x 10 backends.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use shoal_lb::{Applier, Model, Protocol, Ruleset, VirtualService, load_elements};

fn ruleset(services: u32, backends: u32) -> Ruleset {
    let addr = |base: Ipv4Addr, i: u32| Ipv4Addr::from(u32::from(base) + i);
    Ruleset {
        table: "shoal_lb".into(),
        vips: vec![],
        services: (0..services)
            .map(|s| VirtualService {
                id: format!("s{s}"),
                vip: addr(Ipv4Addr::new(10, 96, 0, 0), s),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                backends: (0..backends)
                    .map(|b| addr(Ipv4Addr::new(10, 128, 0, 0), s * backends + b))
                    .collect(),
                ..Default::default()
            })
            .collect(),
        local_endpoints: vec![],
    }
}

/// A fresh namespace, deleted when dropped.
struct Ns(String);

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Ns {
    fn new() -> Ns {
        let name = format!(
            "shoal-t-lbx-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        shoal_netns::create(&name).expect("creating a namespace (root needed)");
        Ns(name)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = shoal_netns::delete(&self.0) {
            eprintln!("deleting namespace {}: {e}", self.0);
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS: a number"))
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let lib = Applier::in_process().expect("libnftables.so.1");
    println!("medians of {rounds} loads into fresh namespaces, ms");
    for n in [1_000u32, 10_000] {
        let m = Model::from_ruleset(&ruleset(n, 10));
        let (mut structure, mut elements, mut whole) = (vec![], vec![], vec![]);
        let mut sent = None;
        for _ in 0..rounds {
            let ns = Ns::new();
            // The namespace's libnftables context is made by the first command: not counted.
            rt.block_on(lib.list_table(&ns.0, "shoal_lb")).unwrap();
            let t = Instant::now();
            rt.block_on(lib.apply_script(&ns.0, &m.render_structure()))
                .unwrap();
            structure.push(ms(t.elapsed()));
            let t = Instant::now();
            sent = Some(rt.block_on(load_elements(&ns.0, &m)).unwrap());
            elements.push(ms(t.elapsed()));

            let ns = Ns::new();
            rt.block_on(lib.list_table(&ns.0, "shoal_lb")).unwrap();
            let t = Instant::now();
            rt.block_on(lib.apply_script(&ns.0, &m.render())).unwrap();
            whole.push(ms(t.elapsed()));
        }
        let (s, e) = (median(structure), median(elements));
        println!(
            "{n:>6} services: structure (nft) {s:7.1} + elements (netlink) {e:7.1} = {:7.1} | whole table through nft {:7.1} | {:?}",
            s + e,
            median(whole),
            sent.unwrap()
        );
    }
}
