//! Cost of applying a ruleset: in-process (libnftables) vs spawning `nft -f -`.
//!
//! `cargo run --release -p shoal-lb --example apply_cost [-- ROUNDS]` as root. Works in a fresh
//! namespace `shoal-t-lbx-<pid>-bench` (deleted on exit, also on panic); prints the median
//! and range of ROUNDS (default 10) applies of each size with each applier.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use shoal_lb::{Applier, Protocol, Ruleset, VirtualService, render};

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

/// Deletes the namespace when dropped.
struct Ns(String);

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

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS: a number"))
        .unwrap_or(10);
    let ns = Ns(format!("shoal-t-lbx-{}-bench", std::process::id()));
    shoal_netns::create(&ns.0).expect("creating the namespace (root needed)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let lib = Applier::in_process().expect("libnftables.so.1");

    // The first in-process command creates the namespace's context.
    let t = Instant::now();
    rt.block_on(lib.list_table(&ns.0, "shoal_lb")).unwrap();
    println!(
        "context creation (first command in the namespace): {:.2} ms",
        ms(t.elapsed())
    );

    println!("apply (validate + render + run), median of {rounds} [min - max], ms:");
    for (label, rs) in [
        ("1 service x 3 backends", ruleset(1, 3)),
        ("1000 services x 10 backends", ruleset(1000, 10)),
    ] {
        let t = Instant::now();
        let _ = render(&rs);
        let render_ms = ms(t.elapsed());
        let mut line = format!("{label:<28} render {render_ms:7.2}");
        let appliers = [
            ("in-process", lib.clone()),
            ("nft -f -", Applier::process()),
        ];
        // One untimed apply each so that every timed one replaces an existing table; rounds
        // alternate the appliers so that both see the same background load.
        let mut times = [Vec::new(), Vec::new()];
        for (_, a) in &appliers {
            rt.block_on(a.apply(&ns.0, &rs)).unwrap();
        }
        for round in 0..rounds {
            for k in [round % 2, 1 - round % 2] {
                let t = Instant::now();
                rt.block_on(appliers[k].1.apply(&ns.0, &rs)).unwrap();
                times[k].push(ms(t.elapsed()));
            }
        }
        for ((name, _), times) in appliers.iter().zip(&mut times) {
            times.sort_by(f64::total_cmp);
            let median = if times.len() % 2 == 1 {
                times[times.len() / 2]
            } else {
                (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
            };
            line += &format!(
                " | {name} {median:8.2} [{:.2} - {:.2}]",
                times[0],
                times[times.len() - 1]
            );
        }
        println!("{line}");
    }
}
