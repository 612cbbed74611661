//! Shoal's control plane: the store (etcd or embedded) behind one trait, typed keys,
//! address and port allocation, the cluster's operations (every write one transaction),
//! the watched cluster state, liveness, leader election and the orchestrator that places
//! tasks. It knows nothing of kernels or runtimes.

pub mod alloc;
pub mod cluster;
pub mod keys;
pub mod liveness;
pub mod orchestrator;
pub mod reports;
pub mod state;
pub mod store;

/// Test helpers other crates' unit tests share (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
