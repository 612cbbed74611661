//! The program `scripts/ipvs-vm.sh` runs inside a qemu VM booted on a kernel with IPVS
//! (statically linked, as the VM's init runs it). It programs services and destinations with
//! `shoal_lb::ipvs`, reads them back with our client AND `ipvsadm -Sn`, and checks EEXIST /
//! ENOENT mapping, updates, deletes and flush. Last line: `IPVS-TEST: PASS` or
//! `IPVS-TEST: FAIL <reason>`.
//!
//! Expects (the VM's init does it): modules ip_vs, ip_vs_{rr,wrr,sh,mh} loaded, `lo` up and
//! 10.0.0.1/24 on an interface (masquerading destinations need a route).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use shoal_lb::ipvs::{
    self, Dest, DestKey, IpvsClient, IpvsError, IpvsOptions, Op, Scheduler, Service, ServiceKey,
    ServiceWithDests, fwmark_for,
};
use shoal_lb::{Protocol, Ruleset, VirtualService};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn vs(id: &str, vip: &str, p: Protocol, port: u16, tport: u16, b: &[&str]) -> VirtualService {
    VirtualService {
        id: id.into(),
        vip: ip(vip),
        protocol: p,
        port,
        target_port: tport,
        backends: b.iter().map(|s| ip(s)).collect(),
        ..Default::default()
    }
}

fn ruleset(services: Vec<VirtualService>) -> Ruleset {
    Ruleset {
        table: "shoal_lb".into(),
        vips: vec![],
        services,
        local_endpoints: vec![],
    }
}

fn bracket(a: IpAddr) -> String {
    match a {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// Our listing in `ipvsadm -Sn` syntax.
fn as_save(list: &[ServiceWithDests]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in list {
        let k = match s.service.key {
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            } => format!(
                "-{} {}:{port}",
                if protocol == Protocol::Tcp { "t" } else { "u" },
                bracket(addr)
            ),
            ServiceKey::Fwmark { mark, .. } => format!("-f {mark}"),
        };
        let mut line = format!("-A {k} -s {}", s.service.scheduler.name());
        let mut fl = vec![];
        if s.service.flags & 0x8 != 0 {
            fl.push("sh-fallback");
        }
        if s.service.flags & 0x10 != 0 {
            fl.push("sh-port");
        }
        if !fl.is_empty() {
            line += &format!(" -b {}", fl.join(","));
        }
        out.insert(line);
        for d in &s.dests {
            let fwd = match d.fwd {
                ipvs::FwdMethod::Masquerade => "-m",
                ipvs::FwdMethod::DirectRoute | ipvs::FwdMethod::Local => "-g",
                ipvs::FwdMethod::Tunnel => "-i",
                ipvs::FwdMethod::Bypass => "-?",
            };
            out.insert(format!(
                "-a {k} -r {}:{} {fwd} -w {}",
                bracket(d.addr),
                d.port,
                d.weight
            ));
        }
    }
    out
}

fn ipvsadm_save() -> Result<BTreeSet<String>, String> {
    let o = Command::new("/sbin/ipvsadm")
        .arg("-Sn")
        .output()
        .map_err(|e| format!("running ipvsadm: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "ipvsadm -Sn: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect())
}

fn show() {
    if let Ok(o) = Command::new("/sbin/ipvsadm").arg("-Ln").output() {
        print!("{}", String::from_utf8_lossy(&o.stdout));
    }
}

/// Our listing equals `want` and ipvsadm sees the same.
fn check(c: &mut IpvsClient, want: &[ServiceWithDests], step: &str) -> Result<(), String> {
    let got = c.list().map_err(|e| format!("{step}: list: {e}"))?;
    if got != want {
        return Err(format!("{step}: our listing\n{got:#?}\nwanted\n{want:#?}"));
    }
    let ours = as_save(&got);
    let theirs = ipvsadm_save()?;
    if ours != theirs {
        show();
        return Err(format!(
            "{step}: ipvsadm -Sn says {theirs:?}, our client {ours:?}"
        ));
    }
    println!("ok: {step} ({} services, ipvsadm agrees)", got.len());
    Ok(())
}

fn expect_exists(r: Result<(), IpvsError>, what: &str) -> Result<(), String> {
    match r {
        Err(IpvsError::Exists { .. }) => {
            println!("ok: {what} -> Exists");
            Ok(())
        }
        other => Err(format!("{what}: expected Exists, got {other:?}")),
    }
}

fn expect_not_found(r: Result<(), IpvsError>, what: &str) -> Result<(), String> {
    match r {
        Err(IpvsError::NotFound { .. }) => {
            println!("ok: {what} -> NotFound");
            Ok(())
        }
        other => Err(format!("{what}: expected NotFound, got {other:?}")),
    }
}

fn run() -> Result<(), String> {
    let e = |s: &'static str| move |err: IpvsError| format!("{s}: {err}");
    // Through shoal_netns::run_in, as the agent does (here: our own namespace).
    let mut c = IpvsClient::open_in("/proc/self/ns/net").map_err(e("open"))?;
    println!("ok: IPVS family id {}", c.family_id());
    c.flush().map_err(e("flush"))?;
    check(&mut c, &[], "empty after flush")?;

    // 1. A ruleset: two ports on one VIP, one every-port VIP (fwmark), one without backends.
    let rs1 = ruleset(vec![
        vs(
            "web",
            "10.0.0.100",
            Protocol::Tcp,
            80,
            8080,
            &["10.0.0.3", "10.0.0.2"],
        ),
        vs("dns", "10.0.0.100", Protocol::Udp, 53, 5353, &["10.0.0.2"]),
        vs(
            "all",
            "10.0.0.101",
            Protocol::Tcp,
            0,
            0,
            &["10.0.0.4", "10.0.0.5"],
        ),
        vs("empty", "10.0.0.102", Protocol::Tcp, 443, 443, &[]),
    ]);
    let opts = IpvsOptions::default();
    let want1 = ipvs::desired_services(&rs1, &opts).map_err(e("desired"))?;
    let ops = ipvs::apply_plan(&mut c, &want1).map_err(e("apply 1"))?;
    if ops.len() != 4 + 5 {
        return Err(format!("apply 1: expected 9 operations, got {ops:?}"));
    }
    check(&mut c, &want1, "apply ruleset 1")?;
    show();
    let again = ipvs::apply_plan(&mut c, &want1).map_err(e("apply 1 again"))?;
    if !again.is_empty() {
        return Err(format!("re-apply of the same ruleset did {again:?}"));
    }
    println!("ok: re-apply is a no-op");

    // 2. EEXIST / ENOENT / ESRCH.
    let web = ServiceKey::tcp(ip("10.0.0.100"), 80);
    let web_svc = Service::new(web, Scheduler::Rr);
    expect_exists(c.add_service(&web_svc), "add existing service")?;
    let d2 = Dest::masq(ip("10.0.0.2").into(), 8080, 1);
    expect_exists(c.add_dest(&web, &d2), "add existing destination")?;
    let nosvc = ServiceKey::tcp(ip("10.0.0.200"), 80);
    expect_not_found(c.del_service(&nosvc), "delete missing service")?;
    expect_not_found(
        c.update_service(&Service::new(nosvc, Scheduler::Rr)),
        "update missing service",
    )?;
    expect_not_found(
        c.add_dest(&nosvc, &d2),
        "add destination to missing service",
    )?;
    let nodest = DestKey {
        addr: ip("10.0.0.9").into(),
        port: 8080,
    };
    expect_not_found(c.del_dest(&web, &nodest), "delete missing destination")?;
    expect_not_found(
        c.update_dest(&web, &Dest::masq(nodest.addr, 8080, 3)),
        "update missing destination",
    )?;
    match c.add_service(&Service::new(
        ServiceKey::tcp(ip("10.0.0.103"), 80),
        Scheduler::Other("nosuchsched".into()),
    )) {
        Err(e @ IpvsError::UnknownScheduler { .. }) => println!("ok: unknown scheduler -> {e}"),
        other => return Err(format!("unknown scheduler: got {other:?}")),
    }
    check(&mut c, &want1, "unchanged after refused requests")?;

    // 3. Weight update through the client.
    let mut d2w = d2.clone();
    d2w.weight = 5;
    c.update_dest(&web, &d2w).map_err(e("update weight"))?;
    let got = c.dests(&web).map_err(e("dests"))?;
    if !got.contains(&d2w) {
        return Err(format!("weight 5 not listed: {got:?}"));
    }
    if !ipvsadm_save()?.contains("-a -t 10.0.0.100:80 -r 10.0.0.2:8080 -m -w 5") {
        show();
        return Err("ipvsadm does not show weight 5".into());
    }
    println!("ok: weight update visible to ipvsadm");
    // The planner puts it back.
    let ops = ipvs::apply_plan(&mut c, &want1).map_err(e("restore weight"))?;
    if ops != vec![Op::UpdateDest(web, d2.clone())] {
        return Err(format!("restore weight: {ops:?}"));
    }
    check(&mut c, &want1, "weight restored by the planner")?;

    // 4. Schedulers: wrr for everything via the planner (UpdateService only), then sh (with
    //    sh-port) and mh services directly.
    let wrr = IpvsOptions {
        scheduler: Scheduler::Wrr,
        flags: 0,
    };
    let want_wrr = ipvs::desired_services(&rs1, &wrr).map_err(e("desired wrr"))?;
    let ops = ipvs::apply_plan(&mut c, &want_wrr).map_err(e("apply wrr"))?;
    if ops.len() != 4 || !ops.iter().all(|o| matches!(o, Op::UpdateService(_))) {
        return Err(format!("apply wrr: {ops:?}"));
    }
    check(&mut c, &want_wrr, "scheduler rr -> wrr")?;
    let mut sh = Service::new(ServiceKey::udp(ip("10.0.0.110"), 53), Scheduler::Sh);
    sh.flags = 0x10; // IP_VS_SVC_F_SCHED_SH_PORT
    let mh = Service::new(ServiceKey::tcp(ip("10.0.0.111"), 80), Scheduler::Mh);
    c.add_service(&sh).map_err(e("add sh"))?;
    c.add_service(&mh).map_err(e("add mh"))?;
    let mut want_s = want_wrr.clone();
    want_s.push(ServiceWithDests {
        service: sh.clone(),
        dests: vec![],
    });
    want_s.push(ServiceWithDests {
        service: mh.clone(),
        dests: vec![],
    });
    want_s.sort_by_key(|a| a.service.key);
    check(&mut c, &want_s, "sh (sh-port) and mh services")?;

    // 5. A changed ruleset: a backend gone, one new, a service gone, the fwmark service's
    //    backends changed; the extra sh/mh services are deleted by the planner.
    let rs2 = ruleset(vec![
        vs(
            "web",
            "10.0.0.100",
            Protocol::Tcp,
            80,
            8080,
            &["10.0.0.3", "10.0.0.6"],
        ),
        vs("all", "10.0.0.101", Protocol::Tcp, 0, 0, &["10.0.0.5"]),
        vs(
            "empty",
            "10.0.0.102",
            Protocol::Tcp,
            443,
            443,
            &["10.0.0.7"],
        ),
    ]);
    let want2 = ipvs::desired_services(&rs2, &wrr).map_err(e("desired 2"))?;
    let ops = ipvs::apply_plan(&mut c, &want2).map_err(e("apply 2"))?;
    let mark = fwmark_for(ip("10.0.0.101"), Protocol::Tcp);
    let expect = [
        Op::DelService(ServiceKey::udp(ip("10.0.0.100"), 53)),
        Op::DelService(ServiceKey::tcp(ip("10.0.0.111"), 80)),
        Op::DelService(ServiceKey::udp(ip("10.0.0.110"), 53)),
    ];
    let dels: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o, Op::DelService(_)))
        .collect();
    if dels.len() != expect.len() || !expect.iter().all(|x| dels.contains(&x)) {
        return Err(format!("apply 2 deletions: {ops:?}"));
    }
    if !ops.contains(&Op::DelDest(
        ServiceKey::Fwmark { ipv6: false, mark },
        DestKey {
            addr: IpAddr::V4(ip("10.0.0.4")),
            port: 0,
        },
    )) || ops.len() != 3 + 4
    {
        return Err(format!("apply 2: {ops:?}"));
    }
    check(&mut c, &want2, "ruleset 2 (diff applied)")?;
    show();

    // 6. Traffic: a local client reaches VIP 10.0.0.120 (TCP 80 and UDP 53) through IPVS,
    //    DNATed to listeners of this guest on 10.0.0.1 (8080 / 5353).
    traffic(&mut c)?;

    // 7. IPv6: a service and a destination (fd00::1/64 is on dummy0).
    let v6 = ServiceKey::Addr {
        protocol: Protocol::Tcp,
        addr: "fd00::100".parse().unwrap(),
        port: 80,
    };
    let v6svc = Service::new(v6, Scheduler::Sh);
    let v6dest = Dest::masq("fd00::2".parse().unwrap(), 8080, 2);
    c.add_service(&v6svc).map_err(e("add ipv6 service"))?;
    c.add_dest(&v6, &v6dest).map_err(e("add ipv6 dest"))?;
    let mut want_v6 = want2.clone();
    want_v6.push(ServiceWithDests {
        service: v6svc,
        dests: vec![v6dest],
    });
    want_v6.sort_by_key(|a| a.service.key);
    check(&mut c, &want_v6, "ipv6 service and destination")?;
    c.del_service(&v6).map_err(e("del ipv6 service"))?;
    check(&mut c, &want2, "ipv6 service deleted")?;

    // 8. Delete and flush.
    c.del_dest(&web, &Dest::masq(ip("10.0.0.6").into(), 8080, 1).key())
        .map_err(e("del dest"))?;
    c.del_service(&ServiceKey::tcp(ip("10.0.0.102"), 443))
        .map_err(e("del service"))?;
    if c.list().map_err(e("list"))?.len() != 2 {
        return Err("after deletes: not 2 services".into());
    }
    c.flush().map_err(e("flush"))?;
    check(&mut c, &[], "flush")?;
    // Port-0 input with a target port is refused before the kernel sees it.
    let bad = ruleset(vec![vs("x", "10.0.0.1", Protocol::Tcp, 0, 80, &[])]);
    if ipvs::desired_services(&bad, &opts).is_ok() {
        return Err("port 0 with target port accepted".into());
    }
    Ok(())
}

fn traffic(c: &mut IpvsClient) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;
    let e = |s: &'static str| move |err: std::io::Error| format!("traffic: {s}: {err}");
    let t = Duration::from_secs(3);
    let rs = ruleset(vec![
        vs("t", "10.0.0.120", Protocol::Tcp, 80, 8080, &["10.0.0.1"]),
        vs("u", "10.0.0.120", Protocol::Udp, 53, 5353, &["10.0.0.1"]),
    ]);
    let want = ipvs::desired_services(&rs, &IpvsOptions::default())
        .map_err(|e| format!("traffic: {e}"))?;
    for s in &want {
        c.add_service(&s.service)
            .map_err(|e| format!("traffic: {e}"))?;
        for d in &s.dests {
            c.add_dest(&s.service.key, d)
                .map_err(|e| format!("traffic: {e}"))?;
        }
    }
    let l = TcpListener::bind("10.0.0.1:8080").map_err(e("bind tcp"))?;
    let server = std::thread::spawn(move || -> std::io::Result<SocketAddr> {
        let (mut s, peer) = l.accept()?;
        s.write_all(b"hello from 10.0.0.1:8080")?;
        Ok(peer)
    });
    let vip: SocketAddr = "10.0.0.120:80".parse().unwrap();
    let mut conn = TcpStream::connect_timeout(&vip, t).map_err(e("connect to VIP"))?;
    conn.set_read_timeout(Some(t)).map_err(e("timeout"))?;
    let mut got = String::new();
    conn.read_to_string(&mut got).map_err(e("read"))?;
    let peer = server
        .join()
        .map_err(|_| "traffic: server panicked".to_string())?
        .map_err(e("accept"))?;
    if got != "hello from 10.0.0.1:8080" {
        return Err(format!("traffic: TCP via VIP got {got:?}"));
    }
    println!("ok: TCP 10.0.0.120:80 -> backend 10.0.0.1:8080 (server saw {peer})");
    let u = UdpSocket::bind("10.0.0.1:5353").map_err(e("bind udp"))?;
    u.set_read_timeout(Some(t)).map_err(e("timeout"))?;
    let cl = UdpSocket::bind("0.0.0.0:0").map_err(e("bind udp client"))?;
    cl.set_read_timeout(Some(t)).map_err(e("timeout"))?;
    cl.send_to(b"ping", "10.0.0.120:53").map_err(e("send"))?;
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf).map_err(e("udp server recv"))?;
    u.send_to(&buf[..n], from).map_err(e("udp server send"))?;
    let (n, reply_from) = cl.recv_from(&mut buf).map_err(e("udp client recv"))?;
    if &buf[..n] != b"ping" || reply_from.to_string() != "10.0.0.120:53" {
        return Err(format!(
            "traffic: UDP reply {:?} from {reply_from}",
            &buf[..n]
        ));
    }
    println!("ok: UDP 10.0.0.120:53 -> backend 10.0.0.1:5353, reply from the VIP");
    for s in &want {
        c.del_service(&s.service.key)
            .map_err(|e| format!("traffic: {e}"))?;
    }
    Ok(())
}

/// Runs `/sbin/ip ARGS` (iproute2, copied into the initramfs: busybox's `ip` cannot create
/// veth pairs into named namespaces).
fn ipr(args: &[&str]) -> Result<(), String> {
    let o = Command::new("/sbin/ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Runs a program inside a namespace; its standard output.
fn run_in_ns(ns: &str, prog: &str, args: &[&str]) -> Result<String, String> {
    use shoal_netns::CommandExt as _;
    let o = Command::new(prog)
        .args(args)
        .in_netns(ns)
        .map_err(|e| format!("{prog} in {ns}: {e}"))?
        .output()
        .map_err(|e| format!("running {prog} in {ns}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{prog} {args:?} in {ns}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

const LB: &str = "lbns";
const CLIENT: &str = "client";

/// Every TCP/UDP listener a backend namespace has: answers with `<name>:<port>`.
fn serve(ns: &str, name: &str, tcp: &[u16], udp: &[u16]) -> Result<(), String> {
    use std::io::Write;
    use std::net::{TcpListener, UdpSocket};
    for &port in tcp {
        let l = shoal_netns::run_in(ns, move || TcpListener::bind(("0.0.0.0", port)))
            .map_err(|e| format!("{ns}: {e}"))?
            .map_err(|e| format!("{ns}: bind tcp {port}: {e}"))?;
        let id = format!("{name}:{port}");
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(id.as_bytes());
            }
        });
    }
    for &port in udp {
        let u = shoal_netns::run_in(ns, move || UdpSocket::bind(("0.0.0.0", port)))
            .map_err(|e| format!("{ns}: {e}"))?
            .map_err(|e| format!("{ns}: bind udp {port}: {e}"))?;
        let id = format!("{name}:{port}");
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(id.as_bytes(), from);
            }
        });
    }
    Ok(())
}

/// A TCP connection from namespace `ns` to `addr`: what the server wrote.
fn tcp_get(ns: &str, addr: &str) -> Result<String, String> {
    use std::io::Read;
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    shoal_netns::run_in(ns, move || -> std::io::Result<String> {
        let t = std::time::Duration::from_secs(3);
        let mut c = std::net::TcpStream::connect_timeout(&sa, t)?;
        c.set_read_timeout(Some(t))?;
        let mut got = String::new();
        c.read_to_string(&mut got)?;
        Ok(got)
    })
    .map_err(|e| format!("{ns}: {e}"))?
    .map_err(|e| format!("TCP {ns} -> {addr}: {e}"))
}

/// One UDP datagram from namespace `ns` to `addr`: the answer and where it came from.
fn udp_get(ns: &str, addr: &str) -> Result<(String, String), String> {
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    shoal_netns::run_in(ns, move || -> std::io::Result<(String, String)> {
        let u = std::net::UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        u.send_to(b"ping", sa)?;
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf)?;
        Ok((
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            from.to_string(),
        ))
    })
    .map_err(|e| format!("{ns}: {e}"))?
    .map_err(|e| format!("UDP {ns} -> {addr}: {e}"))
}

/// The IPVS dataplane as the agent runs it (`ipvs::sync`: services + sysctls + companion nft
/// table) in a namespace `lbns` routing between a client and two backends over veths:
///
/// ```text
/// client 10.1.0.2 -- 10.1.0.1 [lbns] 10.2.1.1 -- 10.2.1.2 backend1
///                     VIPs 10.3.0.10-13 10.2.2.1 -- 10.2.2.2 backend2
/// ```
fn dataplane() -> Result<(), String> {
    for ns in [LB, CLIENT, "backend1", "backend2"] {
        shoal_netns::create(ns).map_err(|e| format!("create {ns}: {e}"))?;
        ipr(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    let link = |ns: &str, dev: &str, lb_addr: &str, addr: &str, gw: &str| -> Result<(), String> {
        ipr(&[
            "-n", LB, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ipr(&["-n", LB, "addr", "add", lb_addr, "dev", dev])?;
        ipr(&["-n", LB, "link", "set", dev, "up"])?;
        ipr(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
        ipr(&["-n", ns, "link", "set", "eth0", "up"])?;
        ipr(&["-n", ns, "route", "add", "default", "via", gw])
    };
    link(CLIENT, "c0", "10.1.0.1/24", "10.1.0.2/24", "10.1.0.1")?;
    link("backend1", "b1", "10.2.1.1/24", "10.2.1.2/24", "10.2.1.1")?;
    link("backend2", "b2", "10.2.2.1/24", "10.2.2.2/24", "10.2.2.1")?;
    // VIPs are local routes on lo, as the mesh makes them.
    for vip in ["10.3.0.10", "10.3.0.11", "10.3.0.12", "10.3.0.13"] {
        ipr(&[
            "-n",
            LB,
            "route",
            "add",
            "local",
            &format!("{vip}/32"),
            "dev",
            "lo",
            "table",
            "local",
        ])?;
    }
    serve("backend1", "b1", &[7001, 7002, 8080], &[7003])?;
    serve("backend2", "b2", &[8080, 8443], &[])?;

    let both = &["10.2.1.2", "10.2.2.2"];
    let any_tcp = vs("any", "10.3.0.10", Protocol::Tcp, 0, 0, &["10.2.1.2"]);
    let any_udp = vs("any", "10.3.0.10", Protocol::Udp, 0, 0, &["10.2.1.2"]);
    // A specific port on the every-port VIP: its own service, not marked.
    let tls = vs("tls", "10.3.0.10", Protocol::Tcp, 443, 8443, &["10.2.2.2"]);
    let mut mh = vs("mh", "10.3.0.11", Protocol::Tcp, 80, 8080, both);
    mh.selection = shoal_lb::Selection::Consistent;
    let mut aff = vs("aff", "10.3.0.12", Protocol::Tcp, 80, 8080, both);
    aff.affinity = Some(120);
    let mut drain = vs("drain", "10.3.0.13", Protocol::Tcp, 80, 8080, both);
    drain.draining = vec![ip("10.2.2.2")];
    let mut rs = ruleset(vec![any_tcp, any_udp, tls, mh, aff, drain]);
    // backend1 is a local endpoint: hairpin masquerade when it reaches itself via a VIP.
    rs.local_endpoints = vec![ip("10.2.1.2")];
    let opts = IpvsOptions::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let ops = rt
        .block_on(ipvs::sync(LB, &rs, &opts))
        .map_err(|e| format!("ipvs::sync: {e}"))?;
    println!("ok: ipvs::sync in {LB}: {} operations", ops.len());
    let again = rt
        .block_on(ipvs::sync(LB, &rs, &opts))
        .map_err(|e| format!("ipvs::sync again: {e}"))?;
    if !again.is_empty() {
        return Err(format!("second ipvs::sync did {again:?}"));
    }
    println!("ok: second ipvs::sync is a no-op");
    for (k, v) in ipvs::SYSCTLS {
        let got = shoal_netns::get_sysctl(LB, k).map_err(|e| e.to_string())?;
        if got != v {
            return Err(format!("sysctl {k} = {got} in {LB}, wanted {v}"));
        }
    }
    println!("ok: sysctls set in {LB} (vs.conntrack=1, ...)");
    let table = run_in_ns(LB, "nft", &["list", "table", "ip", ipvs::COMPANION_TABLE])?;
    print!("{table}");
    let adm = run_in_ns(LB, "/sbin/ipvsadm", &["-Ln"])?;
    print!("{adm}");
    let svc_line = |vip: &str| -> Result<String, String> {
        adm.lines()
            .find(|l| l.contains(&format!("{vip}:80 ")))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .ok_or_else(|| format!("no service {vip}:80 in ipvsadm -Ln"))
    };
    let l = svc_line("10.3.0.11")?;
    if !l.starts_with("TCP 10.3.0.11:80 mh") || !l.contains("mh-port") {
        return Err(format!("consistent service not mh: {l:?}"));
    }
    println!("ok: Consistent -> {l:?}");
    let l = svc_line("10.3.0.12")?;
    if !l.contains("persistent 120") {
        return Err(format!("affinity service not persistent 120: {l:?}"));
    }
    println!("ok: affinity 120 s -> {l:?}");
    // The draining backend of 10.3.0.13:80: `-> 10.2.2.2:8080 Masq 0 ...`.
    let block: Vec<String> = adm
        .lines()
        .skip_while(|l| !l.contains("10.3.0.13:80 "))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("->"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    if !block
        .iter()
        .any(|l| l.starts_with("-> 10.2.2.2:8080 Masq 0 "))
        || !block
            .iter()
            .any(|l| l.starts_with("-> 10.2.1.2:8080 Masq 1 "))
    {
        return Err(format!("draining weights of 10.3.0.13:80: {block:?}"));
    }
    println!("ok: draining backend has weight 0: {block:?}");
    let mark = fwmark_for(ip("10.3.0.10"), Protocol::Tcp);
    let fwm = format!("FWM {mark} rr");
    if !adm
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == fwm)
    {
        return Err(format!("no line {fwm:?} in ipvsadm -Ln"));
    }
    println!("ok: port-0 service is {fwm:?}");

    // Traffic. Port-0 service: any port reaches the same port of the backend (fwmark set by
    // the companion table), TCP and UDP; the specific port 443 goes to its own service.
    for port in [7001, 7002] {
        let got = tcp_get(CLIENT, &format!("10.3.0.10:{port}"))?;
        if got != format!("b1:{port}") {
            return Err(format!("TCP 10.3.0.10:{port} (fwmark) got {got:?}"));
        }
        println!("ok: client -> TCP 10.3.0.10:{port} -> {got} (fwmark service)");
    }
    let (got, from) = udp_get(CLIENT, "10.3.0.10:7003")?;
    if got != "b1:7003" || from != "10.3.0.10:7003" {
        return Err(format!("UDP 10.3.0.10:7003 got {got:?} from {from}"));
    }
    println!("ok: client -> UDP 10.3.0.10:7003 -> {got}, reply from {from} (fwmark service)");
    let got = tcp_get(CLIENT, "10.3.0.10:443")?;
    if got != "b2:8443" {
        return Err(format!("TCP 10.3.0.10:443 (own service) got {got:?}"));
    }
    println!("ok: client -> TCP 10.3.0.10:443 -> {got} (specific port not marked)");
    // mh answers.
    let got = tcp_get(CLIENT, "10.3.0.11:80")?;
    println!("ok: client -> mh 10.3.0.11:80 -> {got}");
    // Persistence: rr would alternate; every connection goes to the first one's backend.
    let first = tcp_get(CLIENT, "10.3.0.12:80")?;
    for _ in 0..5 {
        let got = tcp_get(CLIENT, "10.3.0.12:80")?;
        if got != first {
            return Err(format!("persistent service: {first:?} then {got:?}"));
        }
    }
    println!("ok: client -> persistent 10.3.0.12:80: 6 connections all to {first}");
    // Draining: rr over {b1 weight 1, b2 weight 0} only ever picks b1.
    for _ in 0..6 {
        let got = tcp_get(CLIENT, "10.3.0.13:80")?;
        if got != "b1:8080" {
            return Err(format!("draining backend got a new connection: {got:?}"));
        }
    }
    println!("ok: client -> 10.3.0.13:80: 6 connections, none to the draining backend");
    // Hairpin: backend1 reaches itself through the VIP (masquerade of the companion table on
    // IPVS's NAT, visible to netfilter with vs.conntrack=1).
    let got = tcp_get("backend1", "10.3.0.13:80")?;
    if got != "b1:8080" {
        return Err(format!("hairpin backend1 -> 10.3.0.13:80 got {got:?}"));
    }
    println!("ok: hairpin backend1 -> 10.3.0.13:80 -> itself ({got})");
    // Without the companion's mark the any-port VIP has no service: the backend is not
    // reached (nothing listens on the VIP itself: refused).
    rt.block_on(shoal_lb::delete_table(LB, ipvs::COMPANION_TABLE))
        .map_err(|e| format!("delete companion: {e}"))?;
    match tcp_get(CLIENT, "10.3.0.10:7001") {
        Err(e) => println!("ok: without the companion table 10.3.0.10:7001 fails ({e})"),
        Ok(got) => return Err(format!("without fwmarks 10.3.0.10:7001 still got {got:?}")),
    }
    // ... and hairpin fails without its masquerade (the backend would get its own address as
    // source on eth0: a martian, dropped).
    match tcp_get("backend1", "10.3.0.13:80") {
        Err(e) => println!("ok: without the companion table hairpin fails ({e})"),
        Ok(got) => return Err(format!("hairpin without masquerade still got {got:?}")),
    }
    // The next sync converges: the companion table is back, IPVS untouched.
    let ops = rt
        .block_on(ipvs::sync(LB, &rs, &opts))
        .map_err(|e| format!("ipvs::sync after delete: {e}"))?;
    if !ops.is_empty() {
        return Err(format!(
            "sync after deleting the companion table did {ops:?}"
        ));
    }
    let got = tcp_get(CLIENT, "10.3.0.10:7002")?;
    if got != "b1:7002" {
        return Err(format!("after re-sync 10.3.0.10:7002 got {got:?}"));
    }
    println!("ok: re-sync restores the companion table ({got})");
    Ok(())
}

fn main() {
    let r = run().and_then(|()| dataplane());
    match r {
        Ok(()) => println!("IPVS-TEST: PASS"),
        Err(reason) => println!("IPVS-TEST: FAIL {}", reason.replace('\n', " | ")),
    }
}
