//! The tables, as sea-orm entities with typed columns.

pub(super) mod event;
pub(super) mod key;
