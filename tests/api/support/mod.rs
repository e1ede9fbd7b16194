//! What the end-to-end tests share: a fresh database per test, the real server on port 0
//! with a tonic client, requests as the admin backend sends them, the captured logs, and a
//! proxy that cuts the database off.

mod app;
mod cut;
mod db;
mod logs;
mod requests;

pub(crate) use app::*;
pub(crate) use cut::*;
pub(crate) use db::*;
pub(crate) use logs::*;
pub(crate) use requests::*;
