//! What operators see: Prometheus metrics, traces and logs, and the outermost layer that
//! counts, times and traces every call.

pub(crate) mod metrics;
pub mod observe;
mod process;
pub mod telemetry;
