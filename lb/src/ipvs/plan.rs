//! Desired state (pure) and the diff planner: only what changed is touched, so established
//! connections of unchanged destinations keep their IPVS entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::{
    Dest, DestKey, IpvsClient, IpvsError, Scheduler, Service, ServiceKey, ServiceWithDests,
};
use crate::{Protocol, Ruleset};

/// One change to the kernel's IPVS table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddService(Service),
    UpdateService(Service),
    /// Also removes the service's destinations.
    DelService(ServiceKey),
    AddDest(ServiceKey, Dest),
    UpdateDest(ServiceKey, Dest),
    DelDest(ServiceKey, DestKey),
}

/// How [`desired_services`] maps a [`Ruleset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsOptions {
    pub scheduler: Scheduler,
    /// Service flags (e.g. `IP_VS_SVC_F_SCHED_SH_PORT` for `sh`).
    pub flags: u32,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: Scheduler::Rr,
            flags: 0,
        }
    }
}

/// Base of the firewall marks of port-0 services.
pub const FWMARK_BASE: u32 = 0x1000_0000;

/// The firewall mark of the port-0 ("every port") service of `vip`/`protocol`:
/// `FWMARK_BASE + 2 * (low 24 bits of vip) + (1 for UDP)`. Stable (does not depend on the
/// other services) and unique among VIPs that differ in their low 24 bits, i.e. among the VIPs
/// of any network of /8 or smaller — one IPVS table serves one network's namespace.
pub fn fwmark_for(vip: Ipv4Addr, protocol: Protocol) -> u32 {
    let low = u32::from(vip) & 0x00ff_ffff;
    FWMARK_BASE + 2 * low + u32::from(protocol == Protocol::Udp)
}

/// The IPVS services a [`Ruleset`] asks for (pure). Specific ports: `(proto, vip, port)`
/// services with masquerading destinations `backend:target_port`, weight 1. Port 0: a
/// fwmark service ([`fwmark_for`]) whose destinations have port 0 (same port as the packet).
/// `vips` and `local_endpoints` have no IPVS meaning (IPVS drops what no service matches
/// only if the VIP is local; hairpin masquerade is nft's job).
pub fn desired_services(
    rs: &Ruleset,
    opts: &IpvsOptions,
) -> Result<Vec<ServiceWithDests>, IpvsError> {
    let mut out: BTreeMap<ServiceKey, ServiceWithDests> = BTreeMap::new();
    let mut marks: BTreeMap<u32, (Ipv4Addr, Protocol)> = BTreeMap::new();
    for vs in &rs.services {
        let (key, port) = if vs.port == 0 {
            if vs.target_port != 0 {
                return Err(IpvsError::Invalid(format!(
                    "service {}: port 0 (every port) needs target_port 0",
                    vs.id
                )));
            }
            let mark = fwmark_for(vs.vip, vs.protocol);
            if let Some(other) = marks.insert(mark, (vs.vip, vs.protocol))
                && other != (vs.vip, vs.protocol)
            {
                return Err(IpvsError::Invalid(format!(
                    "fwmark {mark:#x} of {} {} collides with {} {}",
                    vs.protocol, vs.vip, other.1, other.0
                )));
            }
            (ServiceKey::Fwmark { ipv6: false, mark }, 0)
        } else {
            (
                ServiceKey::Addr {
                    protocol: vs.protocol,
                    addr: vs.vip.into(),
                    port: vs.port,
                },
                vs.target_port,
            )
        };
        if out.contains_key(&key) {
            return Err(IpvsError::Invalid(format!(
                "service {}: {key} appears twice",
                vs.id
            )));
        }
        let mut service = Service::new(key, opts.scheduler.clone());
        service.flags = opts.flags;
        let dests: BTreeSet<Dest> = vs
            .backends
            .iter()
            .map(|b| Dest::masq(IpAddr::V4(*b), port, 1))
            .collect();
        out.insert(
            key,
            ServiceWithDests {
                service,
                dests: dests.into_iter().collect(),
            },
        );
    }
    Ok(out.into_values().collect())
}

/// The operations that turn `current` into `desired` (pure, deterministic): services that are
/// gone are deleted first, then for each kept service its option change, its gone, changed and
/// new destinations, then new services with their destinations. Services keyed alike are
/// compared by scheduler/flags/timeout/netmask, destinations by address+port, then by
/// forwarding method/weight/thresholds.
pub fn plan(current: &[ServiceWithDests], desired: &[ServiceWithDests]) -> Vec<Op> {
    let cur: BTreeMap<ServiceKey, &ServiceWithDests> =
        current.iter().map(|s| (s.service.key, s)).collect();
    let want: BTreeMap<ServiceKey, &ServiceWithDests> =
        desired.iter().map(|s| (s.service.key, s)).collect();
    let mut ops = vec![];
    for key in cur.keys() {
        if !want.contains_key(key) {
            ops.push(Op::DelService(*key));
        }
    }
    for (key, w) in &want {
        let Some(c) = cur.get(key) else { continue };
        if c.service != w.service {
            ops.push(Op::UpdateService(w.service.clone()));
        }
        let cd: BTreeMap<DestKey, &Dest> = c.dests.iter().map(|d| (d.key(), d)).collect();
        let wd: BTreeMap<DestKey, &Dest> = w.dests.iter().map(|d| (d.key(), d)).collect();
        for dk in cd.keys() {
            if !wd.contains_key(dk) {
                ops.push(Op::DelDest(*key, *dk));
            }
        }
        for (dk, d) in &wd {
            match cd.get(dk) {
                Some(old) if old == d => {}
                Some(_) => ops.push(Op::UpdateDest(*key, (*d).clone())),
                None => {}
            }
        }
        for (dk, d) in &wd {
            if !cd.contains_key(dk) {
                ops.push(Op::AddDest(*key, (*d).clone()));
            }
        }
    }
    for (key, w) in &want {
        if cur.contains_key(key) {
            continue;
        }
        ops.push(Op::AddService(w.service.clone()));
        let wd: BTreeMap<DestKey, &Dest> = w.dests.iter().map(|d| (d.key(), d)).collect();
        for d in wd.values() {
            ops.push(Op::AddDest(*key, (*d).clone()));
        }
    }
    ops
}

/// Lists the kernel's table through `client`, plans the difference to `desired` and executes
/// it, stopping at the first error. Returns the operations done.
pub fn apply_plan(
    client: &mut IpvsClient,
    desired: &[ServiceWithDests],
) -> Result<Vec<Op>, IpvsError> {
    let current = client.list()?;
    let ops = plan(&current, desired);
    for op in &ops {
        client.execute(op)?;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtualService;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn vs(vip: &str, p: Protocol, port: u16, tport: u16, b: &[&str]) -> VirtualService {
        VirtualService {
            id: format!("s{port}"),
            vip: ip(vip),
            protocol: p,
            port,
            target_port: tport,
            backends: b.iter().map(|s| ip(s)).collect(),
            ..Default::default()
        }
    }

    fn rs(services: Vec<VirtualService>) -> Ruleset {
        Ruleset {
            table: "t".into(),
            vips: vec![],
            services,
            local_endpoints: vec![],
        }
    }

    fn d(a: &str, port: u16, w: u32) -> Dest {
        Dest::masq(IpAddr::V4(ip(a)), port, w)
    }

    #[test]
    fn desired_from_ruleset() {
        let r = rs(vec![
            vs(
                "10.0.0.100",
                Protocol::Tcp,
                80,
                8080,
                &["10.0.0.3", "10.0.0.2", "10.0.0.3"],
            ),
            vs("10.0.0.101", Protocol::Udp, 0, 0, &["10.0.0.4"]),
            vs("10.0.0.102", Protocol::Tcp, 443, 443, &[]),
        ]);
        let got = desired_services(&r, &IpvsOptions::default()).unwrap();
        let mark = fwmark_for(ip("10.0.0.101"), Protocol::Udp);
        assert_eq!(mark, 0x1000_0000 + 2 * 101 + 1);
        assert_eq!(
            got,
            vec![
                ServiceWithDests {
                    service: Service::new(ServiceKey::tcp(ip("10.0.0.100"), 80), Scheduler::Rr),
                    dests: vec![d("10.0.0.2", 8080, 1), d("10.0.0.3", 8080, 1)],
                },
                ServiceWithDests {
                    service: Service::new(ServiceKey::tcp(ip("10.0.0.102"), 443), Scheduler::Rr),
                    dests: vec![],
                },
                ServiceWithDests {
                    service: Service::new(ServiceKey::Fwmark { ipv6: false, mark }, Scheduler::Rr),
                    dests: vec![d("10.0.0.4", 0, 1)],
                },
            ]
        );
    }

    #[test]
    fn desired_rejects_bad_input() {
        let o = IpvsOptions::default();
        let r = rs(vec![vs("10.0.0.1", Protocol::Tcp, 0, 80, &[])]);
        assert!(matches!(
            desired_services(&r, &o),
            Err(IpvsError::Invalid(_))
        ));
        let r = rs(vec![
            vs("10.0.0.1", Protocol::Tcp, 80, 80, &[]),
            vs("10.0.0.1", Protocol::Tcp, 80, 81, &[]),
        ]);
        assert!(matches!(
            desired_services(&r, &o),
            Err(IpvsError::Invalid(_))
        ));
        // Same low 24 bits in different /8s: the fwmarks would collide.
        let r = rs(vec![
            vs("10.0.0.1", Protocol::Tcp, 0, 0, &[]),
            vs("11.0.0.1", Protocol::Tcp, 0, 0, &[]),
        ]);
        assert!(matches!(
            desired_services(&r, &o),
            Err(IpvsError::Invalid(_))
        ));
        // TCP and UDP of one VIP do not.
        let r = rs(vec![
            vs("10.0.0.1", Protocol::Tcp, 0, 0, &[]),
            vs("10.0.0.1", Protocol::Udp, 0, 0, &[]),
        ]);
        assert_eq!(desired_services(&r, &o).unwrap().len(), 2);
    }

    #[test]
    fn plan_from_empty_and_noop() {
        let want = desired_services(
            &rs(vec![vs(
                "10.0.0.100",
                Protocol::Tcp,
                80,
                8080,
                &["10.0.0.2"],
            )]),
            &IpvsOptions::default(),
        )
        .unwrap();
        let k = ServiceKey::tcp(ip("10.0.0.100"), 80);
        assert_eq!(
            plan(&[], &want),
            vec![
                Op::AddService(Service::new(k, Scheduler::Rr)),
                Op::AddDest(k, d("10.0.0.2", 8080, 1)),
            ]
        );
        assert_eq!(plan(&want, &want), vec![]);
        assert_eq!(plan(&want, &[]), vec![Op::DelService(k)]);
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let k1 = ServiceKey::tcp(ip("10.0.0.100"), 80);
        let k2 = ServiceKey::udp(ip("10.0.0.100"), 53);
        let k3 = ServiceKey::tcp(ip("10.0.0.101"), 80);
        let k4 = ServiceKey::Fwmark {
            ipv6: false,
            mark: 9,
        };
        let current = vec![
            ServiceWithDests {
                service: Service::new(k1, Scheduler::Rr),
                dests: vec![
                    d("10.0.0.2", 80, 1),
                    d("10.0.0.3", 80, 1),
                    d("10.0.0.4", 80, 1),
                ],
            },
            ServiceWithDests {
                service: Service::new(k2, Scheduler::Rr),
                dests: vec![d("10.0.0.2", 53, 1)],
            },
            ServiceWithDests {
                service: Service::new(k3, Scheduler::Rr),
                dests: vec![d("10.0.0.9", 80, 1)],
            },
        ];
        let desired = vec![
            ServiceWithDests {
                // unchanged options; 10.0.0.2 kept, .3 gone, .4 reweighted, .5 new
                service: Service::new(k1, Scheduler::Rr),
                dests: vec![
                    d("10.0.0.2", 80, 1),
                    d("10.0.0.4", 80, 7),
                    d("10.0.0.5", 80, 1),
                ],
            },
            ServiceWithDests {
                // scheduler changed, dests unchanged
                service: Service::new(k3, Scheduler::Mh),
                dests: vec![d("10.0.0.9", 80, 1)],
            },
            ServiceWithDests {
                service: Service::new(k4, Scheduler::Sh),
                dests: vec![d("10.0.0.6", 0, 1)],
            },
        ];
        assert_eq!(
            plan(&current, &desired),
            vec![
                Op::DelService(k2),
                Op::DelDest(
                    k1,
                    DestKey {
                        addr: IpAddr::V4(ip("10.0.0.3")),
                        port: 80
                    }
                ),
                Op::UpdateDest(k1, d("10.0.0.4", 80, 7)),
                Op::AddDest(k1, d("10.0.0.5", 80, 1)),
                Op::UpdateService(Service::new(k3, Scheduler::Mh)),
                Op::AddService(Service::new(k4, Scheduler::Sh)),
                Op::AddDest(k4, d("10.0.0.6", 0, 1)),
            ]
        );
    }

    #[test]
    fn plan_is_order_independent() {
        let k = ServiceKey::tcp(ip("10.0.0.100"), 80);
        let a = vec![ServiceWithDests {
            service: Service::new(k, Scheduler::Rr),
            dests: vec![d("10.0.0.2", 80, 1), d("10.0.0.3", 80, 1)],
        }];
        let b = vec![ServiceWithDests {
            service: Service::new(k, Scheduler::Rr),
            dests: vec![d("10.0.0.3", 80, 1), d("10.0.0.2", 80, 1)],
        }];
        assert_eq!(plan(&a, &b), vec![]);
    }
}
