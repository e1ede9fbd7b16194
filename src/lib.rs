//! apikeys: a gRPC service that owns API keys for Cloodot workspaces.

pub mod callers;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
mod file_mode;
pub mod grpc;
pub mod index;
pub mod metrics;
pub mod net;
pub mod retention;
pub mod service;
pub mod signal;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod usage;
