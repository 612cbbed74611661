//! Every applier of the node, in the order a pass runs them.

use crate::dataplanes::{
    Dns, Guard, Ingress, IpvsVips, LostFlows, NftVips, Overlays, Publish, Tasks, WireGuard,
};
use crate::reconcile::Dataplane;

/// The VIP dataplane chosen in the configuration.
pub enum Vips {
    Nft(NftVips),
    Ipvs(IpvsVips),
}

/// Every applier of the node, in pass order.
pub struct Appliers {
    pub guard: Guard,
    pub wireguard: WireGuard,
    pub overlays: Overlays,
    pub ingress: Ingress,
    pub publish: Publish,
    pub vips: Vips,
    pub lost: LostFlows,
    pub dns: Dns,
    pub tasks: Tasks,
    pub cni: crate::cni::CniConfigs,
}

impl Appliers {
    /// The appliers in the order a pass runs them: the guard before anything else; the
    /// WireGuard device before the overlays whose VXLAN it carries; the
    /// overlays before what needs them (ingress, VIPs, DNS); published ports once the ingress
    /// plumbing is there; lost flows once the VIPs and ports have dropped their backends;
    /// DNS before the processes it must answer; the CNI conflists last (they name
    /// networks, not kernel objects).
    pub fn in_order(&mut self) -> [&mut dyn Dataplane; 10] {
        let vips: &mut dyn Dataplane = match &mut self.vips {
            Vips::Nft(v) => v,
            Vips::Ipvs(v) => v,
        };
        [
            &mut self.guard,
            &mut self.wireguard,
            &mut self.overlays,
            &mut self.ingress,
            &mut self.publish,
            vips,
            &mut self.lost,
            &mut self.dns,
            &mut self.tasks,
            &mut self.cni,
        ]
    }

    /// The node report's view of what is programmed.
    pub fn report(&mut self, r: &mut crate::report::NodeReport) {
        for a in self.in_order() {
            a.report(r);
        }
    }
}
