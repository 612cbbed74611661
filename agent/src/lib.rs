//! The Shoal agent: one process per node that joins the store, serves the API on its unix
//! socket and `/metrics`, runs the control plane's loops (liveness, orchestration) and the
//! node's reconciler. The parts live in crates of their own, one way: `shoal-api` (model,
//! wire types, client) <- `shoal-control` (store, allocation, cluster operations, state,
//! liveness, orchestrator) <- `shoal-node` (plan, appliers, runtime, health) <- this crate.

pub mod agent;
pub mod cni_api;
pub mod config;
pub mod logs;
pub mod metrics_http;
pub mod server;
