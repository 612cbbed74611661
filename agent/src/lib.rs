//! Shoal agent library: cluster model, store, API, orchestration, the node reconciler and
//! the runtime seam (with the process runtime the labs use). Only this crate knows the cluster model; it
//! translates it into the narrow inputs of the dns, lb and mesh crates.

pub mod agent;
pub mod alloc;
pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod desired;
pub mod drift;
pub mod health;
pub mod keys;
pub mod listening;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod names;
pub mod node;
pub mod orchestrator;
pub mod reports;
pub mod runtime;
pub mod state;
pub mod store;
