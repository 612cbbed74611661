//! Prints the rendered table for N services of B backends each (VIP:80/tcp -> :8080), to
//! measure full loads: `cargo run -p shoal-lb --example render_many -- 1000 10 > /tmp/lb.nft`
//! then `ip netns exec NS nft -f /tmp/lb.nft`.

use std::net::Ipv4Addr;

use shoal_lb::{Protocol, Ruleset, VirtualService, render};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u32>().expect("a number"));
    let services = args.next().unwrap_or(1000);
    let backends = args.next().unwrap_or(10);
    let addr = |base: u32, i: u32| Ipv4Addr::from(base + i);
    let vip_base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    let be_base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let rs = Ruleset {
        table: "shoal_lb".into(),
        vips: vec![],
        services: (0..services)
            .map(|s| VirtualService {
                id: format!("s{s}"),
                vip: addr(vip_base, s),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                backends: (0..backends)
                    .map(|b| addr(be_base, s * backends + b))
                    .collect(),
                ..Default::default()
            })
            .collect(),
        local_endpoints: vec![],
    };
    print!("{}", render(&rs));
}
