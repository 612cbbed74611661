//! A route-netlink connection opened inside a named network namespace, and the few dumps
//! and requests the programmer needs, each wrapped so that a failure says which object
//! in which namespace failed and keeps the netlink cause.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::Handle;

use crate::MeshError;

/// A netlink handle bound to one namespace. The connection task is aborted on drop, so the
/// socket (which pins the namespace) does not outlive its user.
pub(crate) struct Nl {
    pub(crate) ns: String,
    pub(crate) handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Nl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Nl {
    /// Opens a route-netlink socket inside `ns` (a name under /run/netns or an nsfs path).
    pub(crate) fn open(ns: &str) -> Result<Nl, MeshError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _messages) = shoal_netns::run_in(ns, || {
            let _g = rt.enter();
            rtnetlink::new_connection()
        })
        .map_err(|e| MeshError::Netns {
            what: format!("entering namespace {ns:?} for netlink"),
            source: e,
        })?
        .map_err(|source| MeshError::Socket {
            ns: ns.to_string(),
            source,
        })?;
        let task = tokio::spawn(conn);
        Ok(Nl {
            ns: ns.to_string(),
            handle,
            task,
        })
    }

    pub(crate) fn err(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> MeshError {
        let ns = self.ns.clone();
        let what = what.into();
        move |source| MeshError::Netlink { ns, what, source }
    }

    pub(crate) async fn links(&self) -> Result<Vec<Link>, MeshError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing links"))?;
        Ok(msgs.iter().map(Link::from_msg).collect())
    }

    pub(crate) async fn link(&self, name: &str) -> Result<Option<Link>, MeshError> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    pub(crate) async fn addrs(&self) -> Result<Vec<Addr>, MeshError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing addresses"))?;
        Ok(msgs.into_iter().filter_map(Addr::from_msg).collect())
    }

    /// All IPv4 routes of all tables.
    pub(crate) async fn routes(&self) -> Result<Vec<Route>, MeshError> {
        let req = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing routes"))?;
        Ok(msgs.into_iter().filter_map(Route::from_msg).collect())
    }

    /// All neighbour entries of one family (`Inet` for ARP entries, `Bridge` for FDB).
    pub(crate) async fn neighbours(
        &self,
        family: AddressFamily,
    ) -> Result<Vec<NeighbourMessage>, MeshError> {
        let what = match family {
            AddressFamily::Bridge => "listing FDB entries",
            _ => "listing neighbour entries",
        };
        self.handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(self.err(what))
    }

    pub(crate) async fn set_link(
        &self,
        what: String,
        msg: rtnetlink::LinkMessageBuilder<rtnetlink::LinkUnspec>,
    ) -> Result<(), MeshError> {
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(self.err(what))
    }

    /// Deletes a link; one that is already gone (a veth whose peer's namespace was just
    /// removed takes its node side with it) is not an error.
    pub(crate) async fn del_link(&self, index: u32, name: &str) -> Result<(), MeshError> {
        match self.handle.link().del(index).execute().await {
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ENODEV => Ok(()),
            r => r.map_err(self.err(format!("deleting link {name}"))),
        }
    }
}

/// The parts of a link the programmer looks at.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) up: bool,
    pub(crate) mtu: u32,
    pub(crate) mac: Vec<u8>,
    pub(crate) alias: Option<String>,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub(crate) peer_index: Option<u32>,
    pub(crate) is_veth: bool,
    /// Set for a device of kind vxlan.
    pub(crate) vxlan: Option<VxlanAttrs>,
}

/// The VXLAN parameters of a vxlan device as the kernel reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct VxlanAttrs {
    pub(crate) vni: Option<u32>,
    pub(crate) local: Option<Ipv4Addr>,
    pub(crate) port: Option<u16>,
    /// IFLA_VXLAN_LINK: the underlay device's index (in the underlay namespace).
    pub(crate) link: Option<u32>,
    pub(crate) learning: Option<bool>,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: 0,
            mac: Vec::new(),
            alias: None,
            peer_index: None,
            is_veth: false,
            vxlan: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::Address(v) => l.mac = v.clone(),
                LinkAttribute::IfAlias(s) => l.alias = Some(s.clone()),
                LinkAttribute::Link(i) => l.peer_index = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    l.is_veth = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                    if infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
                    {
                        let mut v = VxlanAttrs::default();
                        for i in infos {
                            let LinkInfo::Data(InfoData::Vxlan(data)) = i else {
                                continue;
                            };
                            for d in data {
                                match d {
                                    InfoVxlan::Id(x) => v.vni = Some(*x),
                                    InfoVxlan::Local(x) => v.local = Some(*x),
                                    InfoVxlan::Port(x) => v.port = Some(*x),
                                    InfoVxlan::Link(x) => v.link = Some(*x),
                                    InfoVxlan::Learning(x) => v.learning = Some(*x),
                                    _ => {}
                                }
                            }
                        }
                        l.vxlan = Some(v);
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// An IPv4 interface address.
#[derive(Debug, Clone)]
pub(crate) struct Addr {
    pub(crate) index: u32,
    pub(crate) ip: Ipv4Addr,
    pub(crate) prefix: u8,
    pub(crate) proto: u8,
    pub(crate) msg: AddressMessage,
}

impl Addr {
    fn from_msg(m: AddressMessage) -> Option<Addr> {
        if m.header.family != AddressFamily::Inet {
            return None;
        }
        let mut ip = None;
        let mut proto = 0;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(std::net::IpAddr::V4(v)) => ip = Some(*v),
                AddressAttribute::Address(std::net::IpAddr::V4(v)) if ip.is_none() => ip = Some(*v),
                AddressAttribute::Protocol(p) => proto = u8::from(*p),
                _ => {}
            }
        }
        Some(Addr {
            index: m.header.index,
            ip: ip?,
            prefix: m.header.prefix_len,
            proto,
            msg: m,
        })
    }
}

/// An IPv4 route, reduced to what identifies ours.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) table: u32,
    pub(crate) proto: u8,
    pub(crate) dst: Ipv4Addr,
    pub(crate) dst_len: u8,
    pub(crate) gateway: Option<Ipv4Addr>,
    pub(crate) oif: Option<u32>,
    pub(crate) msg: RouteMessage,
}

impl Route {
    fn from_msg(m: RouteMessage) -> Option<Route> {
        if m.header.address_family != AddressFamily::Inet {
            return None;
        }
        let mut r = Route {
            table: u32::from(m.header.table),
            proto: u8::from(m.header.protocol),
            dst: Ipv4Addr::UNSPECIFIED,
            dst_len: m.header.destination_prefix_length,
            gateway: None,
            oif: None,
            msg: RouteMessage::default(),
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                _ => {}
            }
        }
        r.msg = m;
        Some(r)
    }
}
