//! Kernel WireGuard: the link (rtnetlink, kind "wireguard") and its configuration over
//! generic netlink (family "wireguard": WG_CMD_SET_DEVICE, WG_CMD_GET_DEVICE), with the
//! message types of netlink-packet-wireguard on a blocking netlink socket. Used where the
//! kernel has the module; [`create_link`] tells when it does not.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::{Socket, protocols::NETLINK_GENERIC};

use crate::device::{PeerSpec, PeerStatus};
use crate::{Key, WgError};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> WgError {
    let what = what.into();
    move |source| WgError::Io { what, source }
}

/// Creates the WireGuard link `ifname` in this thread's namespace. `Ok(false)`: the kernel
/// has no WireGuard (EOPNOTSUPP, or the family is missing); the caller falls back to
/// userspace. An existing link of that name is taken as ours.
pub async fn create_link(h: &rtnetlink::Handle, ifname: &str) -> Result<bool, WgError> {
    use futures::TryStreamExt as _;
    let existing = h
        .link()
        .get()
        .match_name(ifname.to_string())
        .execute()
        .try_next()
        .await;
    if let Ok(Some(_)) = existing {
        return Ok(Genl::open().is_ok());
    }
    match h
        .link()
        .add(rtnetlink::LinkWireguard::new(ifname).build())
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| -c.get()) == Some(libc::EOPNOTSUPP) =>
        {
            Ok(false)
        }
        Err(source) => Err(WgError::Netlink {
            what: format!("creating the WireGuard link {ifname}"),
            source,
        }),
    }
}

/// A generic netlink socket with the WireGuard family resolved.
struct Genl {
    sock: Socket,
    family: u16,
    seq: u32,
}

impl Genl {
    fn open() -> Result<Genl, WgError> {
        let mut sock =
            Socket::new(NETLINK_GENERIC).map_err(io("opening a generic netlink socket"))?;
        sock.bind_auto()
            .map_err(io("binding a generic netlink socket"))?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(io("connecting a generic netlink socket"))?;
        let mut g = Genl {
            sock,
            family: 0x10, // GENL_ID_CTRL
            seq: 0,
        };
        let ctrl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())],
        });
        let replies = g.request(ctrl, false)?;
        g.family = replies
            .iter()
            .flat_map(|m| m.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| WgError::Missing("no generic netlink family \"wireguard\"".into()))?;
        Ok(g)
    }

    fn request<F>(
        &mut self,
        mut msg: GenlMessage<F>,
        dump: bool,
    ) -> Result<Vec<GenlMessage<F>>, WgError>
    where
        F: netlink_packet_generic::GenlFamily
            + netlink_packet_core::Emitable
            + netlink_packet_core::ParseableParametrized<[u8], netlink_packet_generic::GenlHeader>
            + std::fmt::Debug,
    {
        msg.set_resolved_family_id(self.family);
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | if dump { NLM_F_DUMP } else { 0 };
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(io("sending a netlink request"))?;
        let mut out = vec![];
        loop {
            let (data, _) = self
                .sock
                .recv_from_full()
                .map_err(io("reading a netlink reply"))?;
            let mut off = 0;
            while off < data.len() {
                let m =
                    NetlinkMessage::<GenlMessage<F>>::deserialize(&data[off..]).map_err(|e| {
                        WgError::Missing(format!("a netlink reply that does not parse: {e}"))
                    })?;
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(i) => out.push(i),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(c) => Err(WgError::Io {
                                what: "a WireGuard netlink request".into(),
                                source: std::io::Error::from_raw_os_error(-c.get()),
                            }),
                            None => Ok(out),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
}

fn peer_attrs(p: &PeerSpec) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(p.public_key.0),
        WireguardPeerAttribute::Endpoint(SocketAddr::V4(p.endpoint)),
        WireguardPeerAttribute::PersistentKeepalive(25),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
            WireguardAllowedIpAttr::IpAddr(IpAddr::V4(p.allowed)),
            WireguardAllowedIpAttr::Cidr(32),
        ])]),
    ])
}

/// A kernel WireGuard device's configuration channel: one generic netlink socket with the
/// family resolved, kept for the device's life (every pass reads its peers).
pub struct KernelWg {
    genl: std::sync::Mutex<Genl>,
}

impl KernelWg {
    pub fn open() -> Result<KernelWg, WgError> {
        Ok(KernelWg {
            genl: std::sync::Mutex::new(Genl::open()?),
        })
    }

    fn genl(&self) -> std::sync::MutexGuard<'_, Genl> {
        self.genl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the key, the port, the peers in `upsert` (added or updated in place, their session
    /// kept) and removes the peers in `remove`, in one request.
    pub fn set_device(
        &self,
        ifname: &str,
        key: Option<&Key>,
        port: u16,
        upsert: &[&PeerSpec],
        remove: &[Key],
    ) -> Result<(), WgError> {
        let mut attrs = vec![
            WireguardAttribute::IfName(ifname.to_string()),
            WireguardAttribute::ListenPort(port),
        ];
        if let Some(k) = key {
            attrs.push(WireguardAttribute::PrivateKey(k.0));
        }
        let mut peers: Vec<WireguardPeer> = upsert.iter().map(|p| peer_attrs(p)).collect();
        peers.extend(remove.iter().map(|k| {
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(k.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])
        }));
        if !peers.is_empty() {
            attrs.push(WireguardAttribute::Peers(peers));
        }
        self.genl()
            .request(
                GenlMessage::from_payload(WireguardMessage {
                    cmd: WireguardCmd::SetDevice,
                    attributes: attrs,
                }),
                false,
            )
            .map_err(|e| match e {
                WgError::Io { source, .. } => WgError::Io {
                    what: format!("configuring WireGuard device {ifname}"),
                    source,
                },
                e => e,
            })?;
        Ok(())
    }

    /// The device's peers with their handshake and counters.
    pub fn peers(&self, ifname: &str) -> Result<Vec<PeerStatus>, WgError> {
        let replies = self.genl().request(
            GenlMessage::from_payload(WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::IfName(ifname.to_string())],
            }),
            true,
        )?;
        let mut out = vec![];
        for r in &replies {
            for a in &r.payload.attributes {
                let WireguardAttribute::Peers(ps) = a else {
                    continue;
                };
                for WireguardPeer(pa) in ps {
                    let mut st = PeerStatus {
                        public_key: Key([0; 32]),
                        endpoint: None,
                        last_handshake: None,
                        rx_bytes: 0,
                        tx_bytes: 0,
                    };
                    for x in pa {
                        match x {
                            WireguardPeerAttribute::PublicKey(k) => st.public_key = Key(*k),
                            WireguardPeerAttribute::Endpoint(e) => st.endpoint = Some(*e),
                            WireguardPeerAttribute::RxBytes(b) => st.rx_bytes = *b,
                            WireguardPeerAttribute::TxBytes(b) => st.tx_bytes = *b,
                            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                                let at = SystemTime::UNIX_EPOCH
                                    + Duration::new(t.seconds as u64, t.nano_seconds as u32);
                                st.last_handshake = SystemTime::now().duration_since(at).ok();
                            }
                            _ => {}
                        }
                    }
                    out.push(st);
                }
            }
        }
        Ok(out)
    }
}
