//! Shoal's lab: labs of several nodes on one host (namespaces, a shared store, the real
//! agent binary), `lab compare` (publish modes side by side, with an HTML report) and the
//! whoami echo server its tasks run. Not part of the agent: the agent library knows
//! nothing of it.

pub mod compare;
pub mod lab;
pub mod whoami;
