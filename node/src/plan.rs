//! What this node's kernel and processes should look like, computed whole from the cluster
//! model and a few facts about the node: plain data, no kernel access, no applied state.
//! The appliers ([`crate::dataplanes`]) diff it against what they applied (and the kernel).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::desired::{self, Underlay, View};
use crate::runtime::TaskSpec;
use shoal_api::model::{HealthCheck, Task, TaskState};
use shoal_control::state::ClusterState;

/// What the plan needs to know about the node besides the cluster model.
pub struct NodeFacts<'a> {
    pub node_id: &'a str,
    pub netns_prefix: &'a str,
    pub underlay: Option<&'a Underlay>,
    /// The search domains of task resolv.conf files.
    pub search: &'a [String],
    /// A task's network namespace, when the runtime has made it.
    pub task_netns: &'a (dyn Fn(&str) -> Option<String> + Sync),
    /// Tasks being stopped or removed (out of DNS and backends already).
    pub stopping: &'a HashSet<String>,
    /// The node's WireGuard key and port (None: WireGuard off).
    pub wireguard: Option<&'a desired::WgFacts>,
}

/// A DNS view shared by every local container on the same networks, with its records built
/// once.
#[derive(Debug)]
pub struct DnsView {
    pub view: View,
    pub records: Arc<shoal_dns::Records>,
}

/// One local container that should be answered at 127.0.0.11.
#[derive(Debug, Clone)]
pub struct DnsTask {
    pub name: String,
    /// Its namespace, when made.
    pub netns: Option<String>,
    /// The networks it is attached to (all must be in place before it is served).
    pub networks: Vec<String>,
    pub view: Arc<DnsView>,
}

/// The VIP ruleset of one overlay network in its namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct VipPlan {
    pub netns: String,
    pub ruleset: shoal_lb::Ruleset,
}

/// Ingress plumbing, node marks and published ports: present while anything is published.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressPlan {
    pub network_id: String,
    pub spec: shoal_mesh::ingress::IngressSpec,
    pub marks: BTreeMap<[u8; 6], u32>,
    pub publish: shoal_lb::publish::PublishSpec,
}

/// A local task that should run.
#[derive(Debug, Clone)]
pub struct RunTask {
    pub spec: TaskSpec,
    pub health: Option<HealthCheck>,
    pub last_health: Option<shoal_api::model::Health>,
}

/// The whole desired state of this node.
#[derive(Debug)]
pub struct NodePlan {
    /// The underlay guard in the node namespace.
    pub guard: shoal_lb::guard::GuardSpec,
    /// Overlay networks with a local attached task, by network id.
    pub overlays: BTreeMap<String, shoal_mesh::NetworkSpec>,
    /// The prefix of overlay namespace names (others with it are swept).
    pub overlay_ns_prefix: String,
    pub ingress: Option<IngressPlan>,
    /// VIP rulesets of the (non-ingress) overlay networks here, by network id.
    pub vips: BTreeMap<String, VipPlan>,
    /// Local containers served DNS, by task id.
    pub dns: BTreeMap<String, DnsTask>,
    /// Local tasks that should run, by task id.
    pub run: BTreeMap<String, RunTask>,
    /// Local tasks to stop (not running by desire, not being stopped yet).
    pub stop: Vec<Task>,
    /// Every task id the cluster has (a runtime's task outside it is garbage).
    pub known_tasks: HashSet<String>,
    /// Networks that get a CNI conflist: the attachable ones, by name.
    pub cni_networks: Vec<String>,
    /// The node's WireGuard device, while the cluster has an encrypted network.
    pub wireguard: Option<shoal_wg::DeviceSpec>,
}

impl NodePlan {
    /// Some local task to serve has no namespace yet (the prepare phase makes it).
    pub fn needs_namespaces(&self) -> bool {
        self.dns.values().any(|t| t.netns.is_none())
    }

    pub fn compute(st: &ClusterState, f: &NodeFacts<'_>) -> NodePlan {
        let local: Vec<&Task> = desired::local_tasks(st, f.node_id).collect();
        let overlays = desired::mesh_specs(st, f.node_id, f.netns_prefix, f.underlay, f.task_netns);
        let node_addr = f
            .underlay
            .map(|u| u.addr)
            .unwrap_or(shoal_mesh::ingress::NODE_LINK_ADDR);
        let ingress = match (
            desired::ingress_network(st),
            desired::ingress_spec(st, f.node_id, f.netns_prefix, f.underlay, f.task_netns),
            desired::publish_spec(st, f.node_id, node_addr),
        ) {
            (Some(net), Some(spec), Some(publish)) => Some(IngressPlan {
                network_id: net.id.clone(),
                spec,
                marks: desired::ingress_marks(st, f.node_id),
                publish,
            }),
            _ => None,
        };
        let vips = overlays
            .keys()
            .filter_map(|id| st.network_by_id(id).filter(|n| !n.ingress))
            .map(|net| {
                (
                    net.id.clone(),
                    VipPlan {
                        netns: crate::names::network_netns(f.netns_prefix, net),
                        ruleset: desired::lb_ruleset(st, f.node_id, &net.id),
                    },
                )
            })
            .collect();
        let mut views: BTreeMap<Vec<String>, Arc<DnsView>> = BTreeMap::new();
        let mut dns = BTreeMap::new();
        let mut run = BTreeMap::new();
        let mut stop = vec![];
        for t in &local {
            if t.desired_state != TaskState::Running {
                if !f.stopping.contains(&t.id) {
                    stop.push((*t).clone());
                }
                continue;
            }
            if f.stopping.contains(&t.id) {
                continue;
            }
            let networks: Vec<String> = t.networks.iter().map(|n| n.network_id.clone()).collect();
            let view = views
                .entry(networks.clone())
                .or_insert_with(|| {
                    let view = desired::dns_view(st, &networks);
                    let records = Arc::new(view.to_records());
                    Arc::new(DnsView { view, records })
                })
                .clone();
            dns.insert(
                t.id.clone(),
                DnsTask {
                    name: t.name(),
                    netns: (f.task_netns)(&t.id),
                    networks,
                    view,
                },
            );
            if let Some(svc) = st.service_by_id(&t.service_id) {
                run.insert(
                    t.id.clone(),
                    RunTask {
                        spec: TaskSpec {
                            id: t.id.clone(),
                            name: t.name(),
                            service: svc.name.clone(),
                            hostname: t.hostname(),
                            image: svc.image.clone(),
                            external: svc.standalone.as_ref().is_some_and(|sa| sa.cni.is_some()),
                            command: svc.command.clone(),
                            env: svc.env.clone(),
                            search: f.search.to_vec(),
                            resolv_conf: desired::resolv_conf(f.search),
                        },
                        health: svc.health.clone(),
                        last_health: t.health,
                    },
                );
            }
        }
        NodePlan {
            guard: desired::guard_spec(st, f.node_id, &overlays, f.wireguard.map(|w| w.port)),
            wireguard: desired::wireguard_spec(st, f.node_id, f.underlay, f.wireguard),
            overlays,
            overlay_ns_prefix: crate::names::network_netns_prefix(f.netns_prefix),
            ingress,
            vips,
            dns,
            run,
            stop,
            known_tasks: st.tasks.keys().cloned().collect(),
            cni_networks: desired::cni_networks(st),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{fixture, net};
    use shoal_api::model::{Health, Node, NodeStatus, TaskNetwork};

    /// The plan of node "me" where the tasks in `with_ns` have their namespace.
    fn plan(st: &ClusterState, with_ns: &[&str], stopping: &[&str]) -> NodePlan {
        let with_ns: HashSet<String> = with_ns.iter().map(|s| s.to_string()).collect();
        let stopping: HashSet<String> = stopping.iter().map(|s| s.to_string()).collect();
        let task_netns = move |id: &str| with_ns.contains(id).then(|| format!("p-t-{id}"));
        NodePlan::compute(
            st,
            &NodeFacts {
                node_id: "me",
                netns_prefix: "p-",
                underlay: None,
                search: &["example.org".to_string()],
                task_netns: &task_netns,
                stopping: &stopping,
                wireguard: None,
            },
        )
    }

    fn backends(p: &NodePlan, net: &str) -> Vec<String> {
        let mut b: Vec<String> = p.vips[net]
            .ruleset
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.to_string()))
            .collect();
        b.sort();
        b.dedup();
        b
    }

    #[test]
    fn the_plan_of_a_node_is_its_whole_desired_state() {
        let st = fixture();
        let p = plan(&st, &["t1", "t3", "t4"], &[]);
        // Both networks of the local tasks have an overlay and a VIP table (the dnsrr
        // network's is empty).
        assert_eq!(
            p.overlays.keys().collect::<Vec<_>>(),
            ["n1aaaaaaaaaaaa", "n2bbbbbbbbbbbb"]
        );
        assert_eq!(
            p.vips.keys().collect::<Vec<_>>(),
            ["n1aaaaaaaaaaaa", "n2bbbbbbbbbbbb"]
        );
        assert!(p.vips["n2bbbbbbbbbbbb"].ruleset.services.is_empty());
        assert_eq!(p.vips["n1aaaaaaaaaaaa"].netns, "p-n-n1aaaaaaaaaa");
        // Serving replicas on live nodes (t3 is still starting).
        assert_eq!(backends(&p, "n1aaaaaaaaaaaa"), ["10.0.1.3", "10.0.1.4"]);
        // Every local task to run is served DNS and started, with its resolv.conf.
        assert_eq!(p.dns.keys().collect::<Vec<_>>(), ["t1", "t3", "t4"]);
        assert_eq!(p.run.keys().collect::<Vec<_>>(), ["t1", "t3", "t4"]);
        assert!(p.run["t1"].spec.resolv_conf.contains("example.org"));
        assert_eq!(p.dns["t1"].netns.as_deref(), Some("p-t-t1"));
        // Containers on the same networks share one view (and one record table).
        assert!(Arc::ptr_eq(&p.dns["t1"].view, &p.dns["t3"].view));
        assert!(!Arc::ptr_eq(&p.dns["t1"].view, &p.dns["t4"].view));
        assert!(p.stop.is_empty());
        assert!(!p.needs_namespaces());
        // Nothing is published without the ingress network.
        assert!(p.ingress.is_none());
        assert_eq!(p.overlay_ns_prefix, "p-n-");
        assert!(p.known_tasks.contains("t2"), "a remote task is not garbage");
    }

    #[test]
    fn a_task_without_its_namespace_is_prepared_before_it_joins_an_overlay() {
        let st = fixture();
        let p = plan(&st, &["t1"], &[]);
        assert!(p.needs_namespaces());
        assert_eq!(p.dns["t4"].netns, None);
        // t4 is the only task on the second network: no overlay there until it has one.
        assert_eq!(p.overlays.keys().collect::<Vec<_>>(), ["n1aaaaaaaaaaaa"]);
        let ends = &p.overlays["n1aaaaaaaaaaaa"].endpoints;
        assert_eq!(ends.len(), 1, "{ends:?}");
    }

    #[test]
    fn node_loss_takes_its_replicas_out_of_vips_and_answers() {
        let mut st = fixture();
        st.alive.remove("other-node");
        let p = plan(&st, &["t1", "t3", "t4"], &[]);
        assert_eq!(backends(&p, "n1aaaaaaaaaaaa"), ["10.0.1.3"]);
        let (ips, _) = &p.dns["t1"].view.view.a["tasks.web"];
        assert_eq!(ips, &["10.0.1.3".parse::<std::net::Ipv4Addr>().unwrap()]);
    }

    #[test]
    fn a_task_to_stop_leaves_answers_and_is_stopped_once() {
        let mut st = fixture();
        st.tasks.get_mut("t1").unwrap().0.desired_state = TaskState::Shutdown;
        let p = plan(&st, &["t1", "t3", "t4"], &[]);
        assert_eq!(
            p.stop.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["t1"]
        );
        assert!(!p.dns.contains_key("t1") && !p.run.contains_key("t1"));
        // Drained: not a backend any more, though its process still runs.
        assert_eq!(backends(&p, "n1aaaaaaaaaaaa"), ["10.0.1.4"]);
        // Being stopped already: not stopped again.
        let p = plan(&st, &["t1", "t3", "t4"], &["t1"]);
        assert!(p.stop.is_empty());
        // A running task being removed (garbage) is out of DNS too.
        let p = plan(&st, &["t1", "t3", "t4"], &["t3"]);
        assert!(!p.dns.contains_key("t3") && !p.run.contains_key("t3"));
    }

    #[test]
    fn health_checks_and_the_last_result_go_with_the_task() {
        let mut st = fixture();
        let check = HealthCheck {
            cmd: "true".into(),
            interval_ms: 1000,
            retries: 3,
        };
        st.services.get_mut("web").unwrap().0.health = Some(check.clone());
        st.tasks.get_mut("t1").unwrap().0.health = Some(Health::Healthy);
        let p = plan(&st, &["t1", "t3", "t4"], &[]);
        assert_eq!(p.run["t1"].health, Some(check));
        assert_eq!(p.run["t1"].last_health, Some(Health::Healthy));
        assert_eq!(p.run["t4"].health, None);
    }

    /// The fixture with the ingress network, t1 on it, and the other node registered.
    fn with_ingress() -> ClusterState {
        let mut st = fixture();
        let mut ing = net("ningressxxxxxx", "ingress", "10.255.0.0/16", false);
        ing.ingress = true;
        st.networks.insert("ingress".into(), ing);
        let t1 = &mut st.tasks.get_mut("t1").unwrap().0;
        t1.networks.push(TaskNetwork {
            network: "ingress".into(),
            network_id: "ningressxxxxxx".into(),
            ip: "10.255.0.5".parse().unwrap(),
            mac: String::new(),
        });
        for (id, addr) in [("me", "192.0.2.1"), ("other-node", "192.0.2.2")] {
            let node = Node {
                id: id.into(),
                name: id.into(),
                addr: Some(addr.parse().unwrap()),
                status: NodeStatus::Ready,
                version: String::new(),
                listening: vec![],
                peer_port: None,
                wireguard: None,
            };
            st.nodes.insert(id.into(), (node, 1));
        }
        st
    }

    #[test]
    fn published_ports_come_and_go_with_the_ingress_plan() {
        let st = with_ingress();
        let p = plan(&st, &["t1", "t3", "t4"], &[]);
        let ing = p.ingress.as_ref().expect("web publishes 8080");
        assert_eq!(ing.network_id, "ningressxxxxxx");
        assert_eq!(ing.publish.ports.len(), 1);
        assert_eq!(ing.publish.ports[0].port, 8080);
        let b: Vec<String> = ing.publish.ports[0]
            .backends
            .iter()
            .map(|(a, t)| format!("{a}:{t}"))
            .collect();
        assert_eq!(b, ["10.255.0.5:80"]);
        assert_eq!(ing.spec.tasks.len(), 1, "t1's source route");
        // The ingress network has an overlay but no VIP table.
        assert!(p.overlays.contains_key("ningressxxxxxx"));
        assert!(!p.vips.contains_key("ningressxxxxxx"));
        // The other live node's VTEP is marked; without an underlay no return path peers.
        let other: std::net::Ipv4Addr = "192.0.2.2".parse().unwrap();
        assert_eq!(
            ing.marks.keys().collect::<Vec<_>>(),
            [&shoal_api::model::vtep_mac(other)]
        );
        assert!(ing.spec.peers.is_empty());
        // The port unpublished: no ingress plan (the appliers take it all down).
        let mut st = st;
        st.services.get_mut("web").unwrap().0.ports.clear();
        assert!(plan(&st, &["t1", "t3", "t4"], &[]).ingress.is_none());
    }

    #[test]
    fn publish_removals_only_keeps_what_was_applied_and_drops_the_rest() {
        let st = with_ingress();
        let full = plan(&st, &["t1", "t3", "t4"], &[]).ingress.unwrap().publish;
        let mut applied = full.clone();
        // Applied before: no backend yet on 8080 (t1 is new), and a port now gone.
        applied.ports[0].backends.clear();
        let mut gone = applied.ports[0].clone();
        gone.port = 9090;
        applied.ports.push(gone);
        let fast = desired::publish_removals_only(&full, &applied);
        assert_eq!(fast.ports.len(), 1, "9090 is not wanted any more");
        assert!(fast.ports[0].backends.is_empty(), "the new backend waits");
        // Nothing applied: nothing to remove.
        let none = shoal_lb::publish::PublishSpec {
            ports: vec![],
            ..full.clone()
        };
        assert!(
            desired::publish_removals_only(&full, &none)
                .ports
                .is_empty()
        );
    }
}
