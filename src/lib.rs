//! apikeys: a gRPC service that owns API keys for Cloodot workspaces.
//!
//! The modules and items made `pub` are what the binary, the benches, the fuzz targets and the
//! tests use; everything else is `pub(crate)`, and `unreachable_pub` keeps it so.
#![warn(unreachable_pub)]

pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
mod error;
mod file_mode;
pub mod grpc;
pub mod index;
mod net;
pub mod observability;
mod reload;
pub mod service;
pub mod store;
mod tls;
mod usage;
