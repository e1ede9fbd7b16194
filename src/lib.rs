//! apikeys: a gRPC service that owns API keys for Cloodot workspaces.

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
mod file_mode;
pub mod grpc;
pub mod index;
pub mod net;
pub mod observability;
pub mod service;
pub mod store;
pub mod tls;
pub mod usage;
