//! Pure parts of the programmer: spec validation and the diffs between what the spec asks
//! for and what the kernel has. No I/O here; unit-tested as data.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::{ENDPOINT_PREFIX, EndpointSpec, MeshError, NetworkSpec, VxlanSpec};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// The alias written on a node-side veth: which task namespace and interface it serves.
/// A veth whose alias differs from its spec's is recreated (the agent reused the name).
pub(crate) fn endpoint_alias(ep: &EndpointSpec) -> String {
    format!("shoal-ep {} {}", ep.task_netns, ep.ifname)
}

/// Parses [`endpoint_alias`] back into (task_netns, ifname).
pub(crate) fn parse_alias(alias: &str) -> Option<(String, String)> {
    let rest = alias.strip_prefix("shoal-ep ")?;
    let (ns, ifname) = rest.rsplit_once(' ')?;
    Some((ns.to_string(), ifname.to_string()))
}

fn ifname_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_IFNAME
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Checks a spec before anything touches the kernel.
pub fn validate(spec: &NetworkSpec) -> Result<(), MeshError> {
    let bad = |m: String| {
        Err(MeshError::InvalidSpec(format!(
            "network {}: {m}",
            spec.netns
        )))
    };
    if shoal_netns::validate_name(&spec.netns).is_err() {
        return bad("invalid namespace name".into());
    }
    if !spec.subnet.contains(&spec.gateway) {
        return bad(format!(
            "gateway {} is outside subnet {}",
            spec.gateway, spec.subnet
        ));
    }
    if !(68..=65535).contains(&spec.mtu) {
        return bad(format!("mtu {} out of range", spec.mtu));
    }
    let mut hosts = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut attach = BTreeSet::new();
    for ep in &spec.endpoints {
        let who = &ep.host_ifname;
        if !ifname_ok(who) || !who.starts_with(ENDPOINT_PREFIX) || who.contains('.') {
            return bad(format!(
                "endpoint name {who:?} must start with {ENDPOINT_PREFIX:?} and be a valid interface name of at most {MAX_IFNAME} bytes without '.'"
            ));
        }
        if !ifname_ok(&ep.ifname) {
            return bad(format!(
                "endpoint {who}: container interface name {:?} is invalid",
                ep.ifname
            ));
        }
        if ep.task_netns.is_empty() || ep.task_netns.contains(' ') {
            return bad(format!(
                "endpoint {who}: task namespace {:?} is invalid",
                ep.task_netns
            ));
        }
        if !spec.subnet.contains(&ep.ip)
            || ep.ip == spec.subnet.network()
            || (spec.subnet.prefix_len() < 31 && ep.ip == spec.subnet.broadcast())
            || ep.ip == spec.gateway
        {
            return bad(format!(
                "endpoint {who}: address {} is not a usable host address of {} (gateway {})",
                ep.ip, spec.subnet, spec.gateway
            ));
        }
        if ep.mac[0] & 1 == 1 || ep.mac == [0; 6] {
            return bad(format!(
                "endpoint {who}: MAC {} is not a unicast address",
                fmt_mac(&ep.mac)
            ));
        }
        if !hosts.insert(who.clone()) {
            return bad(format!("endpoint {who} appears twice"));
        }
        if !ips.insert(ep.ip) {
            return bad(format!("address {} used by two endpoints", ep.ip));
        }
        if !attach.insert((ep.task_netns.clone(), ep.ifname.clone())) {
            return bad(format!(
                "interface {} of task namespace {} used by two endpoints",
                ep.ifname, ep.task_netns
            ));
        }
    }
    for vip in &spec.vips {
        if *vip == spec.gateway || ips.contains(vip) {
            return bad(format!(
                "VIP {vip} collides with the gateway or an endpoint"
            ));
        }
    }
    if let Some(vx) = &spec.vxlan {
        validate_vxlan(spec, vx, &ips)
            .map_err(|m| MeshError::InvalidSpec(format!("network {}: vxlan: {m}", spec.netns)))?;
    }
    Ok(())
}

fn unicast(m: &[u8; 6]) -> bool {
    m[0] & 1 == 0 && *m != [0; 6]
}

fn validate_vxlan(
    spec: &NetworkSpec,
    vx: &VxlanSpec,
    local_ips: &BTreeSet<Ipv4Addr>,
) -> Result<(), String> {
    if !(1..=0x00ff_ffff).contains(&vx.vni) {
        return Err(format!("VNI {} out of range 1..=16777215", vx.vni));
    }
    if vx.port == 0 {
        return Err("port 0".into());
    }
    if vx.local.is_unspecified() || vx.local.is_multicast() || vx.local.is_broadcast() {
        return Err(format!(
            "local address {} is not a unicast address",
            vx.local
        ));
    }
    if !ifname_ok(&vx.underlay_dev) {
        return Err(format!(
            "underlay device name {:?} is invalid",
            vx.underlay_dev
        ));
    }
    if let Some(ns) = &vx.underlay_netns
        && (ns.is_empty() || (!ns.contains('/') && shoal_netns::validate_name(ns).is_err()))
    {
        return Err(format!("underlay namespace {ns:?} is invalid"));
    }
    if !unicast(&vx.mac) {
        return Err(format!("MAC {} is not a unicast address", fmt_mac(&vx.mac)));
    }
    let mut remote_ips = BTreeSet::new();
    let mut mac_of: BTreeMap<Ipv4Addr, [u8; 6]> = BTreeMap::new();
    let mut vtep_of: BTreeMap<[u8; 6], Ipv4Addr> = BTreeMap::new();
    for r in &vx.remotes {
        let ip = r.ip;
        if !spec.subnet.contains(&ip)
            || ip == spec.subnet.network()
            || (spec.subnet.prefix_len() < 31 && ip == spec.subnet.broadcast())
            || ip == spec.gateway
            || spec.vips.contains(&ip)
        {
            return Err(format!(
                "remote endpoint {ip} is not a usable host address of {} (or is the gateway or a VIP)",
                spec.subnet
            ));
        }
        if local_ips.contains(&ip) {
            return Err(format!("remote endpoint {ip} is also a local endpoint"));
        }
        if !remote_ips.insert(ip) {
            return Err(format!("remote endpoint {ip} appears twice"));
        }
        if r.vtep == vx.local || r.vtep.is_unspecified() || r.vtep.is_multicast() {
            return Err(format!(
                "remote endpoint {ip}: VTEP {} is not another node's unicast address",
                r.vtep
            ));
        }
        if !unicast(&r.vtep_mac) || r.vtep_mac == vx.mac {
            return Err(format!(
                "remote endpoint {ip}: VTEP MAC {} is not another node's unicast MAC",
                fmt_mac(&r.vtep_mac)
            ));
        }
        // One MAC per VTEP and one VTEP per MAC: the FDB maps a MAC to one destination.
        if *mac_of.entry(r.vtep).or_insert(r.vtep_mac) != r.vtep_mac {
            return Err(format!("VTEP {} is given two different MACs", r.vtep));
        }
        if *vtep_of.entry(r.vtep_mac).or_insert(r.vtep) != r.vtep {
            return Err(format!(
                "VTEP MAC {} is given to two VTEPs",
                fmt_mac(&r.vtep_mac)
            ));
        }
    }
    Ok(())
}

pub(crate) fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What to do with the members of a set: add the missing, delete the extra.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SetDiff<T> {
    pub add: Vec<T>,
    pub del: Vec<T>,
}

pub(crate) fn diff_sets<T: Ord + Clone>(want: &BTreeSet<T>, have: &BTreeSet<T>) -> SetDiff<T> {
    SetDiff {
        add: want.difference(have).cloned().collect(),
        del: have.difference(want).cloned().collect(),
    }
}

/// A node-side veth found in the network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelEndpoint {
    pub name: String,
    pub alias: Option<String>,
}

/// The fate of each endpoint.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EndpointPlan {
    /// In the kernel, not in the spec: delete.
    pub delete: Vec<String>,
    /// In both, but attached to another task/interface than the spec says: delete, create.
    pub recreate: Vec<String>,
    /// Missing: create.
    pub create: Vec<String>,
    /// In both: check every attribute, fix what differs.
    pub check: Vec<String>,
}

pub(crate) fn plan_endpoints(spec: &[EndpointSpec], kernel: &[KernelEndpoint]) -> EndpointPlan {
    let want: BTreeMap<&str, &EndpointSpec> =
        spec.iter().map(|e| (e.host_ifname.as_str(), e)).collect();
    let have: BTreeMap<&str, &KernelEndpoint> =
        kernel.iter().map(|k| (k.name.as_str(), k)).collect();
    let mut plan = EndpointPlan::default();
    for (name, k) in &have {
        match want.get(name) {
            None => plan.delete.push(name.to_string()),
            Some(ep) if k.alias.as_deref() != Some(endpoint_alias(ep).as_str()) => {
                plan.recreate.push(name.to_string())
            }
            Some(_) => plan.check.push(name.to_string()),
        }
    }
    for name in want.keys() {
        if !have.contains_key(name) {
            plan.create.push(name.to_string());
        }
    }
    plan
}

/// The set of VIPs as a set (duplicates in the spec are harmless).
pub(crate) fn vip_set(vips: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    vips.iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ep(host: &str, ns: &str, ip: [u8; 4]) -> EndpointSpec {
        EndpointSpec {
            task_netns: ns.into(),
            host_ifname: host.into(),
            ifname: "eth0".into(),
            ip: ip.into(),
            mac: [0x02, 0, 0, 0, 0, ip[3]],
            default_route: true,
        }
    }

    fn spec(eps: Vec<EndpointSpec>) -> NetworkSpec {
        NetworkSpec {
            netns: "shoal-n-x".into(),
            subnet: "10.0.1.0/24".parse().unwrap(),
            gateway: [10, 0, 1, 1].into(),
            vips: vec![[10, 0, 1, 200].into()],
            mtu: 1450,
            endpoints: eps,
            vxlan: None,
            egress: None,
        }
    }

    #[test]
    fn valid_spec_passes() {
        validate(&spec(vec![
            ep("sv01", "t1", [10, 0, 1, 2]),
            ep("sv02", "t2", [10, 0, 1, 3]),
        ]))
        .unwrap();
    }

    #[test]
    fn invalid_specs_are_refused() {
        let cases: Vec<(&str, NetworkSpec)> = vec![
            ("prefix", spec(vec![ep("veth1", "t1", [10, 0, 1, 2])])),
            (
                "long name",
                spec(vec![ep("sv0123456789abcd", "t1", [10, 0, 1, 2])]),
            ),
            ("outside", spec(vec![ep("sv01", "t1", [10, 0, 2, 2])])),
            ("gateway ip", spec(vec![ep("sv01", "t1", [10, 0, 1, 1])])),
            ("network ip", spec(vec![ep("sv01", "t1", [10, 0, 1, 0])])),
            ("broadcast", spec(vec![ep("sv01", "t1", [10, 0, 1, 255])])),
            (
                "dup ip",
                spec(vec![
                    ep("sv01", "t1", [10, 0, 1, 2]),
                    ep("sv02", "t2", [10, 0, 1, 2]),
                ]),
            ),
            (
                "dup name",
                spec(vec![
                    ep("sv01", "t1", [10, 0, 1, 2]),
                    ep("sv01", "t2", [10, 0, 1, 3]),
                ]),
            ),
            (
                "dup attach",
                spec(vec![
                    ep("sv01", "t1", [10, 0, 1, 2]),
                    ep("sv02", "t1", [10, 0, 1, 3]),
                ]),
            ),
            (
                "vip is endpoint",
                spec(vec![ep("sv01", "t1", [10, 0, 1, 200])]),
            ),
        ];
        for (what, s) in cases {
            assert!(
                matches!(validate(&s), Err(MeshError::InvalidSpec(_))),
                "{what} should be refused"
            );
        }
        let mut s = spec(vec![]);
        s.gateway = [10, 9, 9, 9].into();
        assert!(validate(&s).is_err());
        let mut s = spec(vec![ep("sv01", "t1", [10, 0, 1, 2])]);
        s.endpoints[0].mac = [0x01, 0, 0, 0, 0, 1];
        assert!(validate(&s).is_err());
    }

    fn vx_spec() -> NetworkSpec {
        let mut s = spec(vec![ep("sv01", "t1", [10, 0, 1, 2])]);
        s.vxlan = Some(VxlanSpec {
            vni: 42,
            local: [192, 0, 2, 1].into(),
            underlay_netns: None,
            underlay_dev: "eth0".into(),
            port: 4789,
            mac: [0x02, 0x56, 192, 0, 2, 1],
            remotes: vec![
                crate::RemoteEndpoint {
                    ip: [10, 0, 1, 3].into(),
                    vtep: [192, 0, 2, 2].into(),
                    vtep_mac: [0x02, 0x56, 192, 0, 2, 2],
                },
                crate::RemoteEndpoint {
                    ip: [10, 0, 1, 4].into(),
                    vtep: [192, 0, 2, 2].into(),
                    vtep_mac: [0x02, 0x56, 192, 0, 2, 2],
                },
            ],
            peers: vec![],
            extra_overhead: 0,
        });
        s
    }

    #[test]
    fn vxlan_specs_are_checked() {
        validate(&vx_spec()).unwrap();
        type Edit = fn(&mut VxlanSpec);
        let cases: Vec<(&str, Edit)> = vec![
            ("vni 0", |v| v.vni = 0),
            ("vni too big", |v| v.vni = 1 << 24),
            ("port 0", |v| v.port = 0),
            ("local unspecified", |v| v.local = Ipv4Addr::UNSPECIFIED),
            ("bad dev", |v| v.underlay_dev = "a/b".into()),
            ("bad ns", |v| v.underlay_netns = Some("".into())),
            ("multicast mac", |v| v.mac[0] = 1),
            ("remote outside", |v| v.remotes[0].ip = [10, 9, 0, 3].into()),
            ("remote is gateway", |v| {
                v.remotes[0].ip = [10, 0, 1, 1].into()
            }),
            ("remote is VIP", |v| {
                v.remotes[0].ip = [10, 0, 1, 200].into()
            }),
            ("remote is local", |v| {
                v.remotes[0].ip = [10, 0, 1, 2].into()
            }),
            ("remote twice", |v| v.remotes[1].ip = v.remotes[0].ip),
            ("vtep is us", |v| v.remotes[0].vtep = v.local),
            ("vtep mac is ours", |v| v.remotes[0].vtep_mac = v.mac),
            ("vtep with two macs", |v| v.remotes[1].vtep_mac[5] = 9),
            ("mac on two vteps", |v| {
                v.remotes[1].vtep = [192, 0, 2, 3].into()
            }),
        ];
        for (what, edit) in cases {
            let mut s = vx_spec();
            edit(s.vxlan.as_mut().unwrap());
            assert!(
                matches!(validate(&s), Err(MeshError::InvalidSpec(ref m)) if m.contains("vxlan")),
                "{what} should be refused"
            );
        }
    }

    #[test]
    fn alias_round_trips() {
        let e = ep("sv01", "/proc/12/ns/net", [10, 0, 1, 2]);
        assert_eq!(
            parse_alias(&endpoint_alias(&e)),
            Some(("/proc/12/ns/net".into(), "eth0".into()))
        );
        assert_eq!(parse_alias("something else"), None);
    }

    #[test]
    fn endpoint_plan() {
        let a = ep("sva", "t1", [10, 0, 1, 2]);
        let b = ep("svb", "t2", [10, 0, 1, 3]);
        let c = ep("svc", "t3", [10, 0, 1, 4]);
        let kernel = vec![
            KernelEndpoint {
                name: "sva".into(),
                alias: Some(endpoint_alias(&a)),
            },
            KernelEndpoint {
                name: "svb".into(),
                alias: Some("shoal-ep t9 eth0".into()),
            },
            KernelEndpoint {
                name: "svz".into(),
                alias: None,
            },
        ];
        let plan = plan_endpoints(&[a, b, c], &kernel);
        assert_eq!(
            plan,
            EndpointPlan {
                delete: vec!["svz".into()],
                recreate: vec!["svb".into()],
                create: vec!["svc".into()],
                check: vec!["sva".into()],
            }
        );
    }

    #[test]
    fn set_diff() {
        let want = vip_set(&[
            [10, 0, 1, 5].into(),
            [10, 0, 1, 6].into(),
            [10, 0, 1, 6].into(),
        ]);
        let have: BTreeSet<Ipv4Addr> = [[10, 0, 1, 6].into(), [10, 0, 1, 7].into()].into();
        assert_eq!(
            diff_sets(&want, &have),
            SetDiff {
                add: vec![[10, 0, 1, 5].into()],
                del: vec![[10, 0, 1, 7].into()],
            }
        );
    }
}
