//! Desired state (pure) and the diff planner: only what changed is touched, so established
//! connections of unchanged destinations keep their IPVS entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::{
    Dest, DestKey, IpvsClient, IpvsError, Scheduler, Service, ServiceKey, ServiceWithDests,
};
use crate::{Protocol, Ruleset, Selection};

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

/// `IP_VS_SVC_F_PERSISTENT` (linux/ip_vs.h): persistent service (client affinity).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_SCHED_SH_PORT` (= `IP_VS_SVC_F_SCHED2`, linux/ip_vs.h): `sh` hashes on ports too.
pub const IP_VS_SVC_F_SCHED_SH_PORT: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED_MH_PORT` (= `IP_VS_SVC_F_SCHED2`): `mh` hashes on addresses AND ports.
/// Not in the uapi header (6.1's linux/ip_vs.h has only the SH flags): the kernel defines it
/// in net/netfilter/ipvs/ip_vs_mh.c as `IP_VS_SVC_F_SCHED2`, ipvsadm in its own copy.
pub const IP_VS_SVC_F_SCHED_MH_PORT: u32 = 0x0010;
/// The scheduler-private flag bits (`IP_VS_SVC_F_SCHED1..3`): meaningful only for the
/// scheduler they were given with, so a per-service scheduler replaces them.
const SCHED_FLAGS: u32 = 0x0008 | 0x0010 | 0x0020;

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
/// services with masquerading destinations `backend:target_port`. Port 0: a fwmark service
/// ([`fwmark_for`]) whose destinations have port 0 (same port as the packet).
///
/// - scheduler: `opts.scheduler` with `opts.flags` for [`Selection::Random`];
///   [`Selection::Consistent`] → `mh` with [`IP_VS_SVC_F_SCHED_MH_PORT`] (Maglev hashing of
///   addresses and ports; the scheduler bits of `opts.flags` are dropped, others kept);
/// - `affinity: Some(t)` (t > 0) → persistent service ([`IP_VS_SVC_F_PERSISTENT`], timeout
///   `t` s, netmask `255.255.255.255`: per client address);
/// - active backends get weight 1, draining ones weight 0 (quiesced: kept with their
///   connections, no new ones). A backend in both lists is draining.
///
/// `vips` and `local_endpoints` have no IPVS meaning here (the companion nft table,
/// [`companion_script`](super::companion_script), does hairpin masquerade).
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
        let mut service = match vs.selection {
            Selection::Random => {
                let mut s = Service::new(key, opts.scheduler.clone());
                s.flags = opts.flags;
                s
            }
            Selection::Consistent => {
                let mut s = Service::new(key, Scheduler::Mh);
                s.flags = (opts.flags & !SCHED_FLAGS) | IP_VS_SVC_F_SCHED_MH_PORT;
                s
            }
        };
        if let Some(t) = vs.affinity.filter(|t| *t > 0) {
            service.flags |= IP_VS_SVC_F_PERSISTENT;
            service.timeout = t;
            service.netmask = u32::MAX;
        }
        let draining: BTreeSet<Ipv4Addr> = vs.draining.iter().copied().collect();
        let dests: BTreeSet<Dest> = vs
            .backends
            .iter()
            .filter(|b| !draining.contains(b))
            .map(|b| Dest::masq(IpAddr::V4(*b), port, 1))
            .chain(draining.iter().map(|b| Dest::masq(IpAddr::V4(*b), port, 0)))
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
    fn consistent_selection_is_mh_with_port_hashing() {
        let mut v = vs("10.0.0.100", Protocol::Tcp, 80, 8080, &["10.0.0.2"]);
        v.selection = Selection::Consistent;
        let mut any = vs("10.0.0.101", Protocol::Udp, 0, 0, &["10.0.0.2"]);
        any.selection = Selection::Consistent;
        let random = vs("10.0.0.102", Protocol::Tcp, 80, 80, &["10.0.0.2"]);
        // The default scheduler's private flags (sh-fallback|sh-port) do not leak into mh;
        // other flags (one-packet) are kept.
        let opts = IpvsOptions {
            scheduler: Scheduler::Sh,
            flags: 0x8 | 0x10 | 0x4,
        };
        let got = desired_services(&rs(vec![v, any, random]), &opts).unwrap();
        let by_key: BTreeMap<ServiceKey, &Service> =
            got.iter().map(|s| (s.service.key, &s.service)).collect();
        let mh = by_key[&ServiceKey::tcp(ip("10.0.0.100"), 80)];
        assert_eq!(mh.scheduler, Scheduler::Mh);
        assert_eq!(mh.flags, IP_VS_SVC_F_SCHED_MH_PORT | 0x4);
        assert_eq!(IP_VS_SVC_F_SCHED_MH_PORT, 0x10, "IP_VS_SVC_F_SCHED2");
        let fw = by_key[&ServiceKey::Fwmark {
            ipv6: false,
            mark: fwmark_for(ip("10.0.0.101"), Protocol::Udp),
        }];
        assert_eq!(
            (fw.scheduler.clone(), fw.flags),
            (Scheduler::Mh, 0x10 | 0x4)
        );
        let sh = by_key[&ServiceKey::tcp(ip("10.0.0.102"), 80)];
        assert_eq!((sh.scheduler.clone(), sh.flags), (Scheduler::Sh, 0x1c));
        // Default options: Random is rr without flags, Consistent mh with the port flag.
        let mut c = vs("10.0.0.100", Protocol::Tcp, 80, 80, &[]);
        c.selection = Selection::Consistent;
        let got = desired_services(&rs(vec![c]), &IpvsOptions::default()).unwrap();
        let mut want = Service::new(ServiceKey::tcp(ip("10.0.0.100"), 80), Scheduler::Mh);
        want.flags = 0x10;
        assert_eq!(got[0].service, want);
    }

    #[test]
    fn affinity_is_a_persistent_service() {
        let mut v = vs("10.0.0.100", Protocol::Tcp, 80, 8080, &["10.0.0.2"]);
        v.affinity = Some(600);
        let mut any = vs("10.0.0.101", Protocol::Tcp, 0, 0, &["10.0.0.2"]);
        any.affinity = Some(30);
        any.selection = Selection::Consistent;
        let mut zero = vs("10.0.0.102", Protocol::Tcp, 80, 80, &[]);
        zero.affinity = Some(0); // as the nft dataplane: no affinity
        let got = desired_services(&rs(vec![v, any, zero]), &IpvsOptions::default()).unwrap();
        let mut p = Service::new(ServiceKey::tcp(ip("10.0.0.100"), 80), Scheduler::Rr);
        p.flags = IP_VS_SVC_F_PERSISTENT;
        p.timeout = 600;
        p.netmask = 0xffff_ffff;
        assert_eq!(got[0].service, p);
        assert_eq!(
            got[1].service,
            Service::new(ServiceKey::tcp(ip("10.0.0.102"), 80), Scheduler::Rr)
        );
        let f = &got[2].service;
        assert_eq!(
            (f.scheduler.clone(), f.flags, f.timeout, f.netmask),
            (Scheduler::Mh, 0x10 | 0x1, 30, 0xffff_ffff)
        );
        // Switching affinity on is one UpdateService, destinations untouched.
        let before = desired_services(
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
        assert_eq!(plan(&before, &got[..1]), vec![Op::UpdateService(p)]);
    }

    #[test]
    fn draining_backends_get_weight_zero() {
        let mut v = vs(
            "10.0.0.100",
            Protocol::Tcp,
            80,
            8080,
            &["10.0.0.2", "10.0.0.3", "10.0.0.4"],
        );
        // .3 in both lists: draining; .5 only draining: kept at weight 0 as well.
        v.draining = vec![ip("10.0.0.5"), ip("10.0.0.3")];
        let mut any = vs("10.0.0.101", Protocol::Udp, 0, 0, &["10.0.0.2"]);
        any.draining = vec![ip("10.0.0.2")];
        let got = desired_services(&rs(vec![v, any]), &IpvsOptions::default()).unwrap();
        assert_eq!(
            got[0].dests,
            vec![
                d("10.0.0.2", 8080, 1),
                d("10.0.0.3", 8080, 0),
                d("10.0.0.4", 8080, 1),
                d("10.0.0.5", 8080, 0),
            ]
        );
        assert_eq!(got[1].dests, vec![d("10.0.0.2", 0, 0)]);
        // Draining an existing backend is a weight update, never a delete.
        let before = desired_services(
            &rs(vec![vs(
                "10.0.0.100",
                Protocol::Tcp,
                80,
                8080,
                &["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"],
            )]),
            &IpvsOptions::default(),
        )
        .unwrap();
        let k = ServiceKey::tcp(ip("10.0.0.100"), 80);
        assert_eq!(
            plan(&before, &got[..1]),
            vec![
                Op::UpdateDest(k, d("10.0.0.3", 8080, 0)),
                Op::UpdateDest(k, d("10.0.0.5", 8080, 0)),
            ]
        );
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
