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

fn main() {
    match run() {
        Ok(()) => println!("IPVS-TEST: PASS"),
        Err(reason) => println!("IPVS-TEST: FAIL {}", reason.replace('\n', " | ")),
    }
}
