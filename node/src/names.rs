//! Names of the kernel objects Shoal makes, in one place: namespaces, interfaces, the VIP
//! table. (The tables of the leaf crates are named there: `shoal_lb::guard::GUARD_TABLE`,
//! `shoal_lb::publish::{PUBLISH_TABLE, MARK_TABLE}`, `shoal_mesh::VXLAN_IFNAME`, ...)

use shoal_api::model::Network;

/// The nft table that holds a network's VIPs in its namespace.
pub const LB_TABLE: &str = "shoal_lb";

/// The agent's own namespace (the node's): published ports and the guard live here.
pub const NODE_NS: &str = "/proc/self/ns/net";

/// The namespace of an overlay network on this node: `{prefix}n-{network id, 12 chars}`.
pub fn network_netns(prefix: &str, net: &Network) -> String {
    format!(
        "{}{}",
        network_netns_prefix(prefix),
        &net.id[..net.id.len().min(12)]
    )
}

/// What every overlay namespace name of ours starts with (others with it are swept).
pub fn network_netns_prefix(prefix: &str) -> String {
    format!("{prefix}n-")
}

/// Node-side end of a network's egress link: `se-{network id, 12 chars}` (15 bytes).
pub fn egress_link(net: &Network) -> String {
    format!("se-{}", &net.id[..net.id.len().min(12)])
}

/// The network namespace of a task: `{prefix}t-{short task id}`.
pub fn task_netns(prefix: &str, task_id: &str) -> String {
    format!("{prefix}t-{}", shoal_api::model::short_id(task_id))
}

/// Node-side veth of a task in a network namespace.
pub fn host_ifname(task_id: &str) -> String {
    format!("sv{}", &task_id[..task_id.len().min(12)])
}

/// Container-side interface of the task's `index`-th network.
pub fn task_ifname(index: usize) -> String {
    format!("eth{index}")
}

/// The podman container of an image task: named as its namespace (unique on the host).
pub fn task_container(prefix: &str, task_id: &str) -> String {
    task_netns(prefix, task_id)
}

/// Container labels: the task id, its service, and the agent's namespace prefix (which
/// containers are this agent's, or a lab's).
pub const LABEL_TASK: &str = "io.shoal.task";
pub const LABEL_SERVICE: &str = "io.shoal.service";
pub const LABEL_PREFIX: &str = "io.shoal.prefix";
