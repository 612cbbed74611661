//! One pass of the node reconciler: every applier, in order, through the three phases of a
//! pass. An applier's failure is recorded (and counted for its dataplane) and never stops
//! the others: what failed is retried on the next pass.

use std::collections::{HashMap, HashSet};

use tracing::{info, warn};

use crate::drift::{DriftWatch, Drifted, Write};
use crate::plan::NodePlan;
use shoal_control::state::ClusterState;

/// The phases of a pass, in order. Every applier sees each phase and acts where it has work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The underlay guard, then what changed for networks and containers already in place
    /// (tasks leaving or joining answers and backends, removals only where a new entry
    /// would need a route this pass has not made yet), before any slower link work.
    Fast,
    /// Namespaces for new tasks (the overlays attach them next).
    Prepare,
    /// Overlays, ingress, published ports, VIPs, DNS, then task processes.
    Main,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Fast, Phase::Prepare, Phase::Main];
}

/// A step of an applier that failed, with its cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ApplyError {
    /// The dataplane (a label of [`crate::metrics::DATAPLANES`]).
    pub dataplane: &'static str,
    /// What was being done, e.g. "ruleset of shoal-n-...".
    pub what: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl ApplyError {
    pub fn new(
        dataplane: &'static str,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> ApplyError {
        ApplyError {
            dataplane,
            what: what.into(),
            source: source.into(),
        }
    }

    /// The error with its causes, for the node report and the log.
    pub fn chain(&self) -> String {
        let mut s = self.what.clone();
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }
}

/// What the appliers of one pass share: the model, the drift watch, what earlier appliers
/// of the pass found (in place, programmed, attached) and the errors so far.
pub struct PassCx<'a> {
    pub st: &'a ClusterState,
    /// The periodic full pass: read back what has no generation to watch (IPVS).
    pub full: bool,
    pub drift: &'a mut DriftWatch,
    /// Tables found changed by someone else, until they are written again: (netns, table)
    /// -> (dataplane, confirmed by read-back).
    pub drift_pending: &'a mut HashMap<(String, &'static str), (&'static str, bool)>,
    pub errors: Vec<ApplyError>,
    /// Networks whose overlay is in place this pass (Main): VIPs, ingress and DNS of
    /// others wait.
    pub ok_networks: HashSet<String>,
    /// Overlay namespaces removed this pass: nothing in them is watched or applied.
    pub removed_ns: Vec<String>,
    /// The ingress plumbing and node marks are in place: published ports may go to it.
    pub ingress_ready: bool,
    /// Namespaces holding NAT state of ours (VIP tables, published ports): where flows to a
    /// lost node are deleted.
    pub nat_namespaces: std::collections::BTreeSet<String>,
    /// Tasks answered at 127.0.0.11 (a task starts only once attached).
    pub dns_attached: HashSet<String>,
}

impl<'a> PassCx<'a> {
    pub fn new(
        st: &'a ClusterState,
        full: bool,
        drift: &'a mut DriftWatch,
        drift_pending: &'a mut HashMap<(String, &'static str), (&'static str, bool)>,
    ) -> PassCx<'a> {
        PassCx {
            st,
            full,
            drift,
            drift_pending,
            errors: vec![],
            ok_networks: HashSet::new(),
            removed_ns: vec![],
            ingress_ready: false,
            nat_namespaces: Default::default(),
            dns_attached: HashSet::new(),
        }
    }

    pub fn fail(
        &mut self,
        dataplane: &'static str,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) {
        self.errors.push(ApplyError::new(dataplane, what, source));
    }

    /// An applier wrote (or read back) a table: the drift watch takes note, and a pending
    /// drift of that table counts as repaired when the write changed the kernel (or the
    /// drift was confirmed by read-back).
    pub async fn wrote(&mut self, netns: &str, w: Write<'_>) {
        if let Some((dp, confirmed)) = self.drift_pending.remove(&(netns.to_string(), w.table))
            && (confirmed || w.changed)
        {
            if confirmed {
                info!(
                    netns,
                    table = w.table,
                    dataplane = dp,
                    "kernel drift repaired"
                );
            } else {
                warn!(
                    netns,
                    table = w.table,
                    dataplane = dp,
                    "kernel drift: table changed by someone else; repaired in place"
                );
            }
            crate::metrics::global().drift_repaired(dp);
        }
        let (dp, table) = (w.dataplane, w.table);
        if let Err(e) = self.drift.wrote(netns, w).await {
            self.fail(dp, format!("drift watch of {table} in {netns}"), e);
        }
    }
}

/// One dataplane of the node: it owns what it applied, and diffs the plan against it (and
/// against the kernel where the kernel can be read cheaply).
#[async_trait::async_trait]
pub trait Dataplane: Send {
    /// Brings its part of the node to the plan in `phase`; failures go to `cx.fail`.
    async fn apply(&mut self, plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>);
    /// Someone else changed one of its tables: forget what was applied there, so that the
    /// next apply writes it again. False when the table is not its own.
    fn forget(&mut self, _drifted: &Drifted) -> bool {
        false
    }
    /// Its part of the node report.
    fn report(&self, _r: &mut crate::report::NodeReport) {}
}

/// Hands each drifted table to the applier that owns it.
pub fn on_drift(
    appliers: &mut [&mut dyn Dataplane],
    drifted: Vec<Drifted>,
    pending: &mut HashMap<(String, &'static str), (&'static str, bool)>,
) {
    for d in drifted {
        if d.confirmed {
            warn!(netns = %d.netns, table = d.table, dataplane = d.dataplane, "kernel drift: table changed or deleted by someone else; putting it back");
        } else {
            tracing::debug!(netns = %d.netns, table = d.table, "nf_tables generation moved; reading the table back");
        }
        if !appliers.iter_mut().any(|a| a.forget(&d)) {
            tracing::debug!(dataplane = d.dataplane, "drift of a table no applier owns");
        }
        pending.insert((d.netns, d.table), (d.dataplane, d.confirmed));
    }
}

/// Runs every applier through `phase`, in order.
pub async fn run_phase(
    appliers: &mut [&mut dyn Dataplane],
    plan: &NodePlan,
    phase: Phase,
    cx: &mut PassCx<'_>,
) {
    for a in appliers.iter_mut() {
        a.apply(plan, phase, cx).await;
    }
}

/// One pass: every applier through every phase, in order, and the errors counted per
/// dataplane. `plan_of` computes the plan from the node as it is now: again after the
/// prepare phase when that made task namespaces (the overlays attach them in this pass).
pub async fn run_pass(
    appliers: &mut [&mut dyn Dataplane],
    cx: &mut PassCx<'_>,
    mut plan_of: impl FnMut() -> NodePlan + Send,
) {
    let mut plan = plan_of();
    run_phase(appliers, &plan, Phase::Fast, cx).await;
    run_phase(appliers, &plan, Phase::Prepare, cx).await;
    if plan.needs_namespaces() {
        plan = plan_of();
    }
    run_phase(appliers, &plan, Phase::Main, cx).await;
    for e in &cx.errors {
        crate::metrics::global().apply_error(e.dataplane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what it was asked to do; fails where told to.
    struct Fake {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail_in: Option<Phase>,
        owns: &'static str,
        forgotten: usize,
    }

    #[async_trait::async_trait]
    impl Dataplane for Fake {
        async fn apply(&mut self, _plan: &NodePlan, phase: Phase, cx: &mut PassCx<'_>) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{phase:?}", self.name));
            if self.fail_in == Some(phase) {
                cx.fail(self.name, "fake step", std::io::Error::other("boom"));
            }
            if self.name == "mesh" && phase == Phase::Main {
                cx.ok_networks.insert("n1".into());
            }
            if self.name == "dns" && phase == Phase::Main {
                // Sees what the applier before it found in this pass.
                assert!(cx.ok_networks.contains("n1"));
            }
        }
        fn forget(&mut self, d: &Drifted) -> bool {
            if d.dataplane == self.owns {
                self.forgotten += 1;
                true
            } else {
                false
            }
        }
    }

    fn fake(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Fake {
        Fake {
            name,
            log: log.clone(),
            fail_in: None,
            owns: name,
            forgotten: 0,
        }
    }

    fn empty_plan() -> NodePlan {
        let st = ClusterState::default();
        let stopping = HashSet::new();
        NodePlan::compute(
            &st,
            &crate::plan::NodeFacts {
                node_id: "n",
                netns_prefix: "p-",
                underlay: None,
                search: &[],
                task_netns: &|_| None,
                stopping: &stopping,
                wireguard: None,
            },
        )
    }

    #[tokio::test]
    async fn every_applier_runs_every_phase_in_order_and_a_failure_stops_nothing() {
        let log = Arc::new(Mutex::new(vec![]));
        let mut guard = fake("guard", &log);
        let mut mesh = fake("mesh", &log);
        mesh.fail_in = Some(Phase::Fast);
        let mut dns = fake("dns", &log);
        dns.fail_in = Some(Phase::Main);
        let st = ClusterState::default();
        let mut drift = DriftWatch::new(shoal_lb::Applier::global().clone());
        let mut pending = HashMap::new();
        let mut cx = PassCx::new(&st, false, &mut drift, &mut pending);
        let mut plans = 0;
        run_pass(&mut [&mut guard, &mut mesh, &mut dns], &mut cx, || {
            plans += 1;
            empty_plan()
        })
        .await;
        assert_eq!(
            plans, 1,
            "no task namespace to make: the plan is computed once"
        );
        let got = log.lock().unwrap().clone();
        assert_eq!(
            got,
            [
                "guard:Fast",
                "mesh:Fast",
                "dns:Fast",
                "guard:Prepare",
                "mesh:Prepare",
                "dns:Prepare",
                "guard:Main",
                "mesh:Main",
                "dns:Main"
            ]
        );
        let failed: Vec<_> = cx.errors.iter().map(|e| e.dataplane).collect();
        assert_eq!(failed, ["mesh", "dns"]);
        assert_eq!(cx.errors[0].chain(), "fake step: boom");
    }

    #[test]
    fn drift_goes_to_the_applier_that_owns_the_table() {
        let log = Arc::new(Mutex::new(vec![]));
        let mut a = fake("guard", &log);
        let mut b = fake("lb_nft", &log);
        let mut pending = HashMap::new();
        let d = |dp: &'static str, table: &'static str| Drifted {
            netns: "ns1".into(),
            table,
            dataplane: dp,
            key: "net".into(),
            confirmed: true,
        };
        on_drift(
            &mut [&mut a, &mut b],
            vec![d("lb_nft", "shoal_lb"), d("nobody", "other")],
            &mut pending,
        );
        assert_eq!((a.forgotten, b.forgotten), (0, 1));
        // Both wait for a write to count as repaired, owned or not.
        assert_eq!(pending.len(), 2);
        assert_eq!(
            pending.get(&("ns1".to_string(), "shoal_lb")),
            Some(&("lb_nft", true))
        );
    }
}
