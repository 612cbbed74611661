//! Shoal agent library: cluster model, store, API, reconciler, lab runtime.

pub mod store;
