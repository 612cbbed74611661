//! The node: its desired state computed whole from a cluster snapshot ([`plan::NodePlan`]),
//! one applier per dataplane ([`dataplanes`]) diffing it against what it applied and the
//! kernel, run in order by [`reconcile::run_pass`]; the runtime seam (and the process
//! runtime the labs use), health checks, drift detection, kernel object names and the
//! agent's counters. It translates the cluster model into the narrow inputs of the dns, lb
//! and mesh crates.

pub mod appliers;
pub mod cni;
pub mod dataplanes;
pub mod desired;
pub mod drift;
pub mod health;
pub mod listening;
pub mod metrics;
pub mod names;
pub mod plan;
pub mod podman;
pub mod reconcile;
pub mod report;
pub mod runtime;
