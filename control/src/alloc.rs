//! Pure allocators. They pick a free value from what is in use; the caller then claims it
//! with a compare-and-swap transaction (a key per value, created only if absent), so two
//! agents racing for the same value can never both win.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use ipnet::Ipv4Net;

/// Default pool for networks created without `--subnet` (Docker's swarm default: 10.0.0.0/8 in /24s).
pub const DEFAULT_POOL: &str = "10.0.0.0/8";
pub const DEFAULT_POOL_PREFIX: u8 = 24;
/// Reserved for the ingress network (created with the cluster), never handed out from the pool.
pub const INGRESS_SUBNET: &str = "10.255.0.0/16";
/// VNIs start here (Docker's overlay driver starts at 4096).
pub const FIRST_VNI: u32 = 4096;
pub const LAST_VNI: u32 = (1 << 24) - 1;
/// Ingress ports picked when `published` is not given (Docker's range).
pub const AUTO_PORTS: RangeInclusive<u16> = 30000..=32767;

pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first /prefix of the pool that overlaps none of `used` and none of `reserved`.
pub fn pick_subnet(
    pool: Ipv4Net,
    prefix: u8,
    used: &[Ipv4Net],
    reserved: &[Ipv4Net],
) -> Option<Ipv4Net> {
    pool.subnets(prefix)
        .ok()?
        .find(|cand| !used.iter().chain(reserved).any(|u| overlaps(cand, u)))
}

/// The gateway of a subnet: its first host address (reserved, never given to a task).
pub fn default_gateway(subnet: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The lowest host address of `subnet` that is not the network/broadcast address, not the
/// gateway and not in `used`.
pub fn pick_ip(subnet: &Ipv4Net, gateway: Ipv4Addr, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    subnet
        .hosts()
        .find(|ip| *ip != gateway && !used.contains(ip))
}

/// Like [`pick_ip`], but serial: the first free address after `after`, wrapping around.
/// Recently released addresses are handed out last, so a stale DNS cache entry or a
/// lingering connection does not meet a new owner at once (libnetwork allocates serially too).
pub fn pick_ip_after(
    subnet: &Ipv4Net,
    gateway: Ipv4Addr,
    used: &HashSet<Ipv4Addr>,
    after: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let free = |ip: &Ipv4Addr| *ip != gateway && !used.contains(ip);
    match after {
        Some(a) if subnet.contains(&a) => subnet
            .hosts()
            .filter(|ip| *ip > a)
            .find(free)
            .or_else(|| subnet.hosts().find(free)),
        _ => subnet.hosts().find(free),
    }
}

pub fn pick_vni(used: &HashSet<u32>) -> Option<u32> {
    (FIRST_VNI..=LAST_VNI).find(|v| !used.contains(v))
}

pub fn pick_port(used: &HashSet<u16>) -> Option<u16> {
    AUTO_PORTS.clone().find(|p| !used.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_skip_overlaps_and_reserved() {
        let pool = net(DEFAULT_POOL);
        let reserved = [net(INGRESS_SUBNET)];
        assert_eq!(
            pick_subnet(pool, 24, &[], &reserved),
            Some(net("10.0.0.0/24"))
        );
        let used = [
            net("10.0.0.0/24"),
            net("10.0.1.0/25"),
            net("10.0.0.0/8").trunc(),
        ];
        assert_eq!(
            pick_subnet(pool, 24, &used[..2], &reserved),
            Some(net("10.0.2.0/24"))
        );
        // A user subnet that covers several /24s blocks all of them.
        assert_eq!(
            pick_subnet(pool, 24, &[net("10.0.0.0/22")], &reserved),
            Some(net("10.0.4.0/24"))
        );
        // A full pool gives nothing.
        assert_eq!(
            pick_subnet(net("10.0.0.0/23"), 24, &[net("10.0.0.0/23")], &[]),
            None
        );
        // The ingress range is never handed out.
        let all_but_ingress: Vec<_> = net("10.0.0.0/8")
            .subnets(16)
            .unwrap()
            .filter(|n| *n != net("10.255.0.0/16"))
            .collect();
        assert_eq!(pick_subnet(pool, 24, &all_but_ingress, &reserved), None);
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.5.0/24")));
        assert!(overlaps(&net("10.0.5.0/24"), &net("10.0.0.0/16")));
        assert!(!overlaps(&net("10.0.5.0/24"), &net("10.0.6.0/24")));
    }

    #[test]
    fn ips_skip_gateway_and_used() {
        let s = net("10.0.1.0/29");
        let gw = default_gateway(&s);
        assert_eq!(gw.to_string(), "10.0.1.1");
        let mut used = HashSet::new();
        let mut got = vec![];
        while let Some(ip) = pick_ip(&s, gw, &used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        // .0 network, .1 gateway, .7 broadcast are never handed out; nothing twice.
        assert_eq!(
            got,
            ["10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5", "10.0.1.6"]
        );
    }

    #[test]
    fn serial_ips_hand_released_addresses_out_last() {
        let s = net("10.0.1.0/29");
        let gw = default_gateway(&s);
        let used = HashSet::from(["10.0.1.3".parse().unwrap()]);
        let after = Some("10.0.1.4".parse().unwrap());
        assert_eq!(
            pick_ip_after(&s, gw, &used, after).unwrap().to_string(),
            "10.0.1.5"
        );
        // Wraps around past the end, skipping the gateway and used addresses.
        let after = Some("10.0.1.6".parse().unwrap());
        assert_eq!(
            pick_ip_after(&s, gw, &used, after).unwrap().to_string(),
            "10.0.1.2"
        );
        assert_eq!(
            pick_ip_after(&s, gw, &used, None).unwrap().to_string(),
            "10.0.1.2"
        );
        let all: HashSet<Ipv4Addr> = s.hosts().collect();
        assert_eq!(pick_ip_after(&s, gw, &all, after), None);
    }

    #[test]
    fn vnis_and_ports() {
        let mut used = HashSet::from([FIRST_VNI, FIRST_VNI + 1]);
        assert_eq!(pick_vni(&used), Some(FIRST_VNI + 2));
        used.clear();
        assert_eq!(pick_vni(&used), Some(4096));
        let ports: HashSet<u16> = AUTO_PORTS.clone().take(3).collect();
        assert_eq!(pick_port(&ports), Some(30003));
        let all: HashSet<u16> = AUTO_PORTS.collect();
        assert_eq!(pick_port(&all), None);
    }
}
