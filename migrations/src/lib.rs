//! Database schema, applied at boot and by `apikeys migrate`. Migrations never import the
//! service's entities: each one is frozen as it was written.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_create_api_keys;
mod m20261126_000002_add_revisions;
mod m20261127_000003_add_lifecycle;
mod m20261127_000004_add_events_and_usage;
mod m20261202_000005_add_governance;
mod m20261202_000006_add_rate_limits;
mod m20261203_000007_add_credits;
mod m20261203_000008_add_rate_limit_windows;

#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_create_api_keys::Migration),
            Box::new(m20261126_000002_add_revisions::Migration),
            Box::new(m20261127_000003_add_lifecycle::Migration),
            Box::new(m20261127_000004_add_events_and_usage::Migration),
            Box::new(m20261202_000005_add_governance::Migration),
            Box::new(m20261202_000006_add_rate_limits::Migration),
            Box::new(m20261203_000007_add_credits::Migration),
            Box::new(m20261203_000008_add_rate_limit_windows::Migration),
        ]
    }
}
