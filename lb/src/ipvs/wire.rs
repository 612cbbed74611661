//! Byte layouts: the generic netlink header (plain netlink is in `src/netlink.rs`), the
//! genetlink controller's CTRL_CMD_GETFAMILY, and the IPVS family's messages (linux/ip_vs.h).
//! Pure: builds and parses byte vectors, no sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Dest, DestKey, FwdMethod, IpvsError, Scheduler, Service, ServiceKey};
use crate::{Protocol, netlink};

pub use crate::netlink::{
    Msg, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NlMsg,
};

// linux/genetlink.h
pub const GENL_HDRLEN: usize = 4;
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// linux/ip_vs.h
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;

pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_FLUSH: u8 = 17;

pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;

pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;

pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_HASHED`: set by the kernel on every listed service, never by us.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x0007;

pub const AF_INET: u16 = libc::AF_INET as u16;
pub const AF_INET6: u16 = libc::AF_INET6 as u16;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

/// A generic-netlink message: nlmsghdr (type = the family id) + genlmsghdr.
fn genl(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Msg {
    Msg::new(family, flags, seq, [cmd, version, 0, 0]) // genlmsghdr: cmd, version, reserved
}

/// Splits a datagram into netlink messages.
pub fn split_msgs(b: &[u8]) -> Result<Vec<NlMsg<'_>>, IpvsError> {
    Ok(netlink::split_msgs(b)?)
}

/// The errno of an NLMSG_ERROR payload (0 = ACK), as a positive number.
pub fn error_code(payload: &[u8]) -> Result<i32, IpvsError> {
    Ok(netlink::error_code(payload)?)
}

/// Iterates attributes: (type without the NESTED/BYTEORDER bits, payload).
pub fn attrs(b: &[u8]) -> Result<Vec<(u16, &[u8])>, IpvsError> {
    Ok(netlink::attrs(b)?)
}

fn get_u16(v: &[u8], what: &str) -> Result<u16, IpvsError> {
    v.get(0..2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or_else(|| IpvsError::Decode(format!("{what}: short u16")))
}

fn get_u32(v: &[u8], what: &str) -> Result<u32, IpvsError> {
    v.get(0..4)
        .map(|s| u32::from_ne_bytes(s.try_into().unwrap()))
        .ok_or_else(|| IpvsError::Decode(format!("{what}: short u32")))
}

/// The 16-byte `union nf_inet_addr`: IPv4 in the first four bytes, the rest zero.
pub fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn af_of(a: IpAddr) -> u16 {
    if a.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn parse_addr(af: u16, v: &[u8], what: &str) -> Result<IpAddr, IpvsError> {
    match af {
        AF_INET if v.len() >= 4 => Ok(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        AF_INET6 if v.len() >= 16 => Ok(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&v[..16]).unwrap(),
        ))),
        _ => Err(IpvsError::Decode(format!(
            "{what}: address of {} bytes for family {af}",
            v.len()
        ))),
    }
}

pub fn proto_num(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    }
}

/// CTRL_CMD_GETFAMILY for `name`.
pub fn get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = genl(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    m.str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// The family id from a CTRL_CMD_NEWFAMILY reply's payload (genlmsghdr + attributes).
pub fn parse_family_id(payload: &[u8]) -> Result<u16, IpvsError> {
    let body = payload
        .get(GENL_HDRLEN..)
        .ok_or_else(|| IpvsError::Decode("short genetlink reply".into()))?;
    for (ty, v) in attrs(body)? {
        if ty == CTRL_ATTR_FAMILY_ID {
            return get_u16(v, "CTRL_ATTR_FAMILY_ID");
        }
    }
    Err(IpvsError::Decode("no CTRL_ATTR_FAMILY_ID in reply".into()))
}

/// The identifying attributes of a service (what the kernel looks it up by), inside an open
/// IPVS_CMD_ATTR_SERVICE nest.
fn put_service_key(m: &mut Msg, key: &ServiceKey) {
    match *key {
        ServiceKey::Addr {
            protocol,
            addr,
            port,
        } => {
            m.u16(IPVS_SVC_ATTR_AF, af_of(addr))
                .u16(IPVS_SVC_ATTR_PROTOCOL, proto_num(protocol))
                .attr(IPVS_SVC_ATTR_ADDR, &addr_bytes(addr))
                .attr(IPVS_SVC_ATTR_PORT, &port.to_be_bytes());
        }
        ServiceKey::Fwmark { ipv6, mark } => {
            m.u16(IPVS_SVC_ATTR_AF, if ipv6 { AF_INET6 } else { AF_INET })
                .u32(IPVS_SVC_ATTR_FWMARK, mark);
        }
    }
}

/// IPVS_SVC_ATTR_NETMASK is a `__be32` mask for IPv4, but the kernel compares the same
/// field as a plain prefix length (1..=128) for IPv6, so that one goes in host order.
fn netmask_bytes(key: &ServiceKey, netmask: u32) -> [u8; 4] {
    if key.is_ipv6() {
        netmask.to_ne_bytes()
    } else {
        netmask.to_be_bytes()
    }
}

fn put_service(m: &mut Msg, s: &Service) {
    m.begin_nest(IPVS_CMD_ATTR_SERVICE);
    put_service_key(m, &s.key);
    let mut flags = [0u8; 8];
    flags[..4].copy_from_slice(&s.flags.to_ne_bytes());
    flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes()); // mask: every flag is ours to set
    m.str(IPVS_SVC_ATTR_SCHED_NAME, s.scheduler.name())
        .attr(IPVS_SVC_ATTR_FLAGS, &flags)
        .u32(IPVS_SVC_ATTR_TIMEOUT, s.timeout)
        .attr(IPVS_SVC_ATTR_NETMASK, &netmask_bytes(&s.key, s.netmask));
    m.end_nest();
}

fn put_key_nest(m: &mut Msg, key: &ServiceKey) {
    m.begin_nest(IPVS_CMD_ATTR_SERVICE);
    put_service_key(m, key);
    m.end_nest();
}

fn put_dest(m: &mut Msg, d: &Dest, full: bool) {
    m.begin_nest(IPVS_CMD_ATTR_DEST);
    m.attr(IPVS_DEST_ATTR_ADDR, &addr_bytes(d.addr))
        .attr(IPVS_DEST_ATTR_PORT, &d.port.to_be_bytes());
    if full {
        m.u32(IPVS_DEST_ATTR_FWD_METHOD, d.fwd as u32)
            .u32(IPVS_DEST_ATTR_WEIGHT, d.weight)
            .u32(IPVS_DEST_ATTR_U_THRESH, d.upper_threshold)
            .u32(IPVS_DEST_ATTR_L_THRESH, d.lower_threshold);
    }
    m.u16(IPVS_DEST_ATTR_ADDR_FAMILY, af_of(d.addr));
    m.end_nest();
}

const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;
const V: u8 = IPVS_GENL_VERSION;

pub fn new_service(fam: u16, seq: u32, s: &Service) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_NEW_SERVICE, V);
    put_service(&mut m, s);
    m.finish()
}

pub fn set_service(fam: u16, seq: u32, s: &Service) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_SET_SERVICE, V);
    put_service(&mut m, s);
    m.finish()
}

pub fn del_service(fam: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_DEL_SERVICE, V);
    put_key_nest(&mut m, key);
    m.finish()
}

pub fn dump_services(fam: u16, seq: u32) -> Vec<u8> {
    genl(fam, DUMP, seq, IPVS_CMD_GET_SERVICE, V).finish()
}

pub fn new_dest(fam: u16, seq: u32, key: &ServiceKey, d: &Dest) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_NEW_DEST, V);
    put_key_nest(&mut m, key);
    put_dest(&mut m, d, true);
    m.finish()
}

pub fn set_dest(fam: u16, seq: u32, key: &ServiceKey, d: &Dest) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_SET_DEST, V);
    put_key_nest(&mut m, key);
    put_dest(&mut m, d, true);
    m.finish()
}

pub fn del_dest(fam: u16, seq: u32, key: &ServiceKey, d: &DestKey) -> Vec<u8> {
    let mut m = genl(fam, ACK, seq, IPVS_CMD_DEL_DEST, V);
    put_key_nest(&mut m, key);
    let stub = Dest::masq(d.addr, d.port, 0);
    put_dest(&mut m, &stub, false);
    m.finish()
}

pub fn dump_dests(fam: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut m = genl(fam, DUMP, seq, IPVS_CMD_GET_DEST, V);
    put_key_nest(&mut m, key);
    m.finish()
}

pub fn flush(fam: u16, seq: u32) -> Vec<u8> {
    genl(fam, ACK, seq, IPVS_CMD_FLUSH, V).finish()
}

/// Finds the nested attribute `ty` in a genetlink payload (genlmsghdr + attributes).
fn nested(payload: &[u8], ty: u16) -> Result<&[u8], IpvsError> {
    let body = payload
        .get(GENL_HDRLEN..)
        .ok_or_else(|| IpvsError::Decode("short genetlink message".into()))?;
    attrs(body)?
        .into_iter()
        .find(|(t, _)| *t == ty)
        .map(|(_, v)| v)
        .ok_or_else(|| IpvsError::Decode(format!("no nested attribute {ty}")))
}

/// A service of a GET_SERVICE dump (genlmsghdr + IPVS_CMD_ATTR_SERVICE). `Ok(None)` for a
/// service we cannot represent (e.g. SCTP): it is left alone.
pub fn parse_service(payload: &[u8]) -> Result<Option<Service>, IpvsError> {
    let nest = nested(payload, IPVS_CMD_ATTR_SERVICE)?;
    let (mut af, mut proto, mut addr, mut port, mut fwmark) = (None, None, None, None, None);
    let mut sched = None;
    let (mut flags, mut timeout, mut netmask) = (0, 0, 0);
    for (ty, v) in attrs(nest)? {
        match ty {
            IPVS_SVC_ATTR_AF => af = Some(get_u16(v, "AF")?),
            IPVS_SVC_ATTR_PROTOCOL => proto = Some(get_u16(v, "PROTOCOL")?),
            IPVS_SVC_ATTR_ADDR => addr = Some(v),
            IPVS_SVC_ATTR_PORT => port = Some(u16::from_be(get_u16(v, "PORT")?)),
            IPVS_SVC_ATTR_FWMARK => fwmark = Some(get_u32(v, "FWMARK")?),
            IPVS_SVC_ATTR_SCHED_NAME => {
                let s = v.split(|b| *b == 0).next().unwrap_or_default();
                sched = Some(String::from_utf8_lossy(s).into_owned());
            }
            IPVS_SVC_ATTR_FLAGS => flags = get_u32(v, "FLAGS")? & !IP_VS_SVC_F_HASHED,
            IPVS_SVC_ATTR_TIMEOUT => timeout = get_u32(v, "TIMEOUT")?,
            IPVS_SVC_ATTR_NETMASK => netmask = get_u32(v, "NETMASK")?,
            _ => {}
        }
    }
    let af = af.ok_or_else(|| IpvsError::Decode("service without AF".into()))?;
    let key = match fwmark {
        Some(mark) if mark != 0 => ServiceKey::Fwmark {
            ipv6: af == AF_INET6,
            mark,
        },
        _ => {
            let protocol = match proto {
                Some(IPPROTO_TCP) => Protocol::Tcp,
                Some(IPPROTO_UDP) => Protocol::Udp,
                _ => return Ok(None),
            };
            let addr = parse_addr(
                af,
                addr.ok_or_else(|| IpvsError::Decode("service without ADDR".into()))?,
                "service ADDR",
            )?;
            let port = port.ok_or_else(|| IpvsError::Decode("service without PORT".into()))?;
            ServiceKey::Addr {
                protocol,
                addr,
                port,
            }
        }
    };
    if !key.is_ipv6() {
        netmask = u32::from_be(netmask);
    }
    Ok(Some(Service {
        key,
        scheduler: Scheduler::from_name(&sched.unwrap_or_default()),
        flags,
        timeout,
        netmask,
    }))
}

/// A destination of a GET_DEST dump (genlmsghdr + IPVS_CMD_ATTR_DEST). `svc_ipv6` is the
/// family used when the kernel sends no IPVS_DEST_ATTR_ADDR_FAMILY (kernels before 4.3).
pub fn parse_dest(payload: &[u8], svc_ipv6: bool) -> Result<Dest, IpvsError> {
    let nest = nested(payload, IPVS_CMD_ATTR_DEST)?;
    let mut af = if svc_ipv6 { AF_INET6 } else { AF_INET };
    let (mut addr, mut port) = (None, None);
    let mut d = Dest::masq(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
    for (ty, v) in attrs(nest)? {
        match ty {
            IPVS_DEST_ATTR_ADDR => addr = Some(v),
            IPVS_DEST_ATTR_PORT => port = Some(u16::from_be(get_u16(v, "dest PORT")?)),
            IPVS_DEST_ATTR_FWD_METHOD => {
                d.fwd = FwdMethod::from_u32(get_u32(v, "FWD_METHOD")? & IP_VS_CONN_F_FWD_MASK)
            }
            IPVS_DEST_ATTR_WEIGHT => d.weight = get_u32(v, "WEIGHT")?,
            IPVS_DEST_ATTR_U_THRESH => d.upper_threshold = get_u32(v, "U_THRESH")?,
            IPVS_DEST_ATTR_L_THRESH => d.lower_threshold = get_u32(v, "L_THRESH")?,
            IPVS_DEST_ATTR_ADDR_FAMILY => af = get_u16(v, "ADDR_FAMILY")?,
            _ => {}
        }
    }
    d.addr = parse_addr(
        af,
        addr.ok_or_else(|| IpvsError::Decode("dest without ADDR".into()))?,
        "dest ADDR",
    )?;
    d.port = port.ok_or_else(|| IpvsError::Decode("dest without PORT".into()))?;
    Ok(d)
}

/// Byte layouts computed by hand from linux/netlink.h, linux/genetlink.h and linux/ip_vs.h
/// (x86-64: host order is little endian; ports, IPv4 netmask are network order).
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use crate::ipvs::DestKey;

    const FAM: u16 = 0x23;

    fn hdr(len: u32, flags: u16, seq: u32, cmd: u8) -> Vec<u8> {
        let mut v = vec![];
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&[0x23, 0x00]); // nlmsg_type = family id
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0, 0]); // pid
        v.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: cmd, version 1, reserved
        v
    }

    /// AF_INET, TCP, 10.0.0.100, port 80 inside a service nest.
    const SVC_TCP_KEY: [u8; 44] = [
        6, 0, 1, 0, 2, 0, 0, 0, // AF: len 6, type 1, AF_INET=2, pad
        6, 0, 2, 0, 6, 0, 0, 0, // PROTOCOL: len 6, type 2, IPPROTO_TCP=6, pad
        20, 0, 3, 0, 10, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // ADDR: 16 bytes
        6, 0, 4, 0, 0, 80, 0, 0, // PORT: network order 0x0050, pad
    ];

    fn tcp_key() -> ServiceKey {
        ServiceKey::tcp(Ipv4Addr::new(10, 0, 0, 100), 80)
    }

    #[test]
    fn getfamily_request() {
        let got = get_family(1, "IPVS");
        let want: Vec<u8> = vec![
            32, 0, 0, 0, // len
            0x10, 0, // GENL_ID_CTRL
            5, 0, // REQUEST | ACK
            1, 0, 0, 0, 0, 0, 0, 0, // seq 1, pid 0
            3, 1, 0, 0, // CTRL_CMD_GETFAMILY, version 1
            9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // FAMILY_NAME "IPVS\0" + pad
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn getfamily_reply() {
        let payload: Vec<u8> = vec![
            1, 2, 0, 0, // CTRL_CMD_NEWFAMILY, version 2
            9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0, // name
            6, 0, 1, 0, 0x23, 0, 0, 0, // FAMILY_ID 0x23
        ];
        assert_eq!(parse_family_id(&payload).unwrap(), 0x23);
        assert!(parse_family_id(&[1, 2, 0, 0]).is_err());
    }

    #[test]
    fn new_service_addr() {
        let mut s = Service::new(tcp_key(), Scheduler::Rr);
        s.flags = 0x10;
        let got = new_service(FAM, 7, &s);
        let mut want = hdr(104, 5, 7, 1);
        want.extend_from_slice(&[84, 0, 0x01, 0x80]); // SERVICE nest | NLA_F_NESTED
        want.extend_from_slice(&SVC_TCP_KEY);
        want.extend_from_slice(&[7, 0, 6, 0, b'r', b'r', 0, 0]); // SCHED_NAME "rr\0" + pad
        want.extend_from_slice(&[12, 0, 7, 0, 0x10, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]); // FLAGS {flags, mask}
        want.extend_from_slice(&[8, 0, 8, 0, 0, 0, 0, 0]); // TIMEOUT 0
        want.extend_from_slice(&[8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff]); // NETMASK 255.255.255.255
        assert_eq!(got, want);
        // SET_SERVICE: same body, command 2.
        let mut set = want.clone();
        set[16] = 2;
        assert_eq!(set_service(FAM, 7, &s), set);
    }

    #[test]
    fn netmask_byte_order() {
        let mut s = Service::new(tcp_key(), Scheduler::Wrr);
        s.netmask = 0xffff_ff00;
        let m = new_service(FAM, 1, &s);
        assert_eq!(&m[m.len() - 4..], &[0xff, 0xff, 0xff, 0x00]);
        let v6 = ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: "fd00::1".parse().unwrap(),
            port: 53,
        };
        let m = new_service(FAM, 1, &Service::new(v6, Scheduler::Sh));
        assert_eq!(&m[m.len() - 4..], &[128, 0, 0, 0]); // prefix length, host order
        // AF_INET6 = 10, address in all 16 bytes.
        assert_eq!(&m[24..32], &[6, 0, 1, 0, 10, 0, 0, 0]);
        assert_eq!(&m[40..44], &[20, 0, 3, 0]);
        assert_eq!(&m[44..60], &"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    }

    #[test]
    fn del_service_and_dump() {
        let mut want = hdr(68, 5, 3, 3);
        want.extend_from_slice(&[48, 0, 0x01, 0x80]);
        want.extend_from_slice(&SVC_TCP_KEY);
        assert_eq!(del_service(FAM, 3, &tcp_key()), want);
        // Fwmark key: AF + FWMARK only.
        let fw = ServiceKey::Fwmark {
            ipv6: false,
            mark: 0x1000_00c9,
        };
        let mut want = hdr(40, 5, 4, 3);
        want.extend_from_slice(&[20, 0, 0x01, 0x80]);
        want.extend_from_slice(&[6, 0, 1, 0, 2, 0, 0, 0]);
        want.extend_from_slice(&[8, 0, 5, 0, 0xc9, 0, 0, 0x10]); // FWMARK, host order
        assert_eq!(del_service(FAM, 4, &fw), want);
        // GET_SERVICE dump: no attributes, REQUEST | DUMP.
        assert_eq!(dump_services(FAM, 5), hdr(20, 0x301, 5, 4));
        assert_eq!(flush(FAM, 6), hdr(20, 5, 6, 17));
        let mut want = hdr(68, 0x301, 8, 8);
        want.extend_from_slice(&[48, 0, 0x01, 0x80]);
        want.extend_from_slice(&SVC_TCP_KEY);
        assert_eq!(dump_dests(FAM, 8, &tcp_key()), want);
    }

    const DEST_10_0_0_2_8080: [u8; 28] = [
        20, 0, 1, 0, 10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // ADDR
        6, 0, 2, 0, 0x1f, 0x90, 0, 0, // PORT 8080 = 0x1f90, network order
    ];

    #[test]
    fn new_and_set_dest() {
        let d = Dest {
            addr: Ipv4Addr::new(10, 0, 0, 2).into(),
            port: 8080,
            fwd: FwdMethod::Masquerade,
            weight: 3,
            upper_threshold: 100,
            lower_threshold: 10,
        };
        let mut want = hdr(140, 5, 9, 5);
        want.extend_from_slice(&[48, 0, 0x01, 0x80]);
        want.extend_from_slice(&SVC_TCP_KEY);
        want.extend_from_slice(&[72, 0, 0x02, 0x80]); // DEST nest | NLA_F_NESTED
        want.extend_from_slice(&DEST_10_0_0_2_8080);
        want.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0, 0]); // FWD_METHOD: IP_VS_CONN_F_MASQ = 0
        want.extend_from_slice(&[8, 0, 4, 0, 3, 0, 0, 0]); // WEIGHT 3
        want.extend_from_slice(&[8, 0, 5, 0, 100, 0, 0, 0]); // U_THRESH
        want.extend_from_slice(&[8, 0, 6, 0, 10, 0, 0, 0]); // L_THRESH
        want.extend_from_slice(&[6, 0, 11, 0, 2, 0, 0, 0]); // ADDR_FAMILY AF_INET
        assert_eq!(new_dest(FAM, 9, &tcp_key(), &d), want);
        want[16] = 6; // SET_DEST
        assert_eq!(set_dest(FAM, 9, &tcp_key(), &d), want);
    }

    #[test]
    fn del_dest_identifies_only() {
        let k = DestKey {
            addr: Ipv4Addr::new(10, 0, 0, 2).into(),
            port: 8080,
        };
        let mut want = hdr(108, 5, 2, 7);
        want.extend_from_slice(&[48, 0, 0x01, 0x80]);
        want.extend_from_slice(&SVC_TCP_KEY);
        want.extend_from_slice(&[40, 0, 0x02, 0x80]);
        want.extend_from_slice(&DEST_10_0_0_2_8080);
        want.extend_from_slice(&[6, 0, 11, 0, 2, 0, 0, 0]);
        assert_eq!(del_dest(FAM, 2, &tcp_key(), &k), want);
    }

    /// A service as the kernel dumps it (nest without NLA_F_NESTED, HASHED flag, stats).
    #[test]
    fn parse_dumped_service() {
        let mut p: Vec<u8> = vec![4, 1, 0, 0]; // genl: NEW_SERVICE reply
        let mut nest = SVC_TCP_KEY.to_vec();
        nest.extend_from_slice(&[8, 0, 6, 0, b'w', b'r', b'r', 0]); // "wrr\0"
        nest.extend_from_slice(&[12, 0, 7, 0, 0x12, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        nest.extend_from_slice(&[8, 0, 8, 0, 0x2c, 1, 0, 0]); // TIMEOUT 300
        nest.extend_from_slice(&[8, 0, 9, 0, 0xff, 0xff, 0xff, 0]); // /24
        nest.extend_from_slice(&[12, 0, 10, 0, 8, 0, 1, 0, 5, 0, 0, 0]); // STATS { CONNS 5 }
        p.extend_from_slice(&((nest.len() + 4) as u16).to_le_bytes());
        p.extend_from_slice(&[1, 0]);
        p.extend_from_slice(&nest);
        let s = parse_service(&p).unwrap().unwrap();
        assert_eq!(
            s,
            Service {
                key: tcp_key(),
                scheduler: Scheduler::Wrr,
                flags: 0x10, // HASHED (0x2) dropped
                timeout: 300,
                netmask: 0xffff_ff00,
            }
        );
        // Fwmark service: no PROTOCOL/ADDR/PORT.
        let mut p: Vec<u8> = vec![4, 1, 0, 0, 40, 0, 1, 0];
        p.extend_from_slice(&[6, 0, 1, 0, 2, 0, 0, 0]);
        p.extend_from_slice(&[8, 0, 5, 0, 7, 0, 0, 0]);
        p.extend_from_slice(&[7, 0, 6, 0, b's', b'h', 0, 0]);
        p.extend_from_slice(&[12, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let s = parse_service(&p).unwrap().unwrap();
        assert_eq!(
            s.key,
            ServiceKey::Fwmark {
                ipv6: false,
                mark: 7
            }
        );
        assert_eq!(s.scheduler, Scheduler::Sh);
        // SCTP (132) is skipped, not an error.
        let mut sctp = SVC_TCP_KEY;
        sctp[12] = 132;
        let mut p: Vec<u8> = vec![4, 1, 0, 0, 48, 0, 1, 0];
        p.extend_from_slice(&sctp);
        assert_eq!(parse_service(&p).unwrap(), None);
    }

    #[test]
    fn parse_dumped_dest() {
        let mut nest = DEST_10_0_0_2_8080.to_vec();
        nest.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0, 0]);
        nest.extend_from_slice(&[8, 0, 4, 0, 5, 0, 0, 0]); // WEIGHT 5
        nest.extend_from_slice(&[8, 0, 5, 0, 0, 0, 0, 0]);
        nest.extend_from_slice(&[8, 0, 6, 0, 0, 0, 0, 0]);
        nest.extend_from_slice(&[8, 0, 7, 0, 9, 0, 0, 0]); // ACTIVE_CONNS, ignored
        nest.extend_from_slice(&[6, 0, 11, 0, 2, 0, 0, 0]);
        let mut p: Vec<u8> = vec![8, 1, 0, 0];
        p.extend_from_slice(&((nest.len() + 4) as u16).to_le_bytes());
        p.extend_from_slice(&[2, 0]);
        p.extend_from_slice(&nest);
        let d = parse_dest(&p, false).unwrap();
        assert_eq!(d, Dest::masq(Ipv4Addr::new(10, 0, 0, 2).into(), 8080, 5));
    }

    #[test]
    fn split_error_and_done() {
        let mut b = vec![];
        // NLMSG_ERROR -EEXIST (17) + the first 16 bytes of the request
        b.extend_from_slice(&[36, 0, 0, 0, 2, 0, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&(-17i32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        // NLMSG_DONE with 0
        b.extend_from_slice(&[20, 0, 0, 0, 3, 0, 2, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let msgs = split_msgs(&b).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].ty, NLMSG_ERROR);
        assert_eq!(msgs[0].seq, 9);
        assert_eq!(error_code(msgs[0].payload).unwrap(), libc::EEXIST);
        assert_eq!(msgs[1].ty, NLMSG_DONE);
        assert_eq!(msgs[1].flags, NLM_F_MULTI);
        assert!(split_msgs(&[200, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
