//! Shoal's wire types: the cluster model (what the store holds and the API returns), the
//! API's request and response bodies, and the typed client the CLI, the lab and the
//! benchmarks use. Validation of user input lives with the model, so a request is refused
//! before anything is written.

pub mod client;
pub mod model;
pub mod wire;
