//! End-to-end tests: the real server on port 0, driven by a tonic client. Each test gets a
//! fresh database: SQLite by default, PostgreSQL when APIKEYS_TEST_DATABASE_URL is set.

mod binary;
mod cli;
mod create_key;
mod credits;
mod delete_key;
mod ext_authz;
mod governance;
mod health_and_reflection;
mod hostile;
mod lifecycle;
mod list_keys;
mod logs;
mod metrics;
mod rate_limits;
mod reliability;
mod replicas;
mod scan;
mod secrets;
mod security;
mod support;
mod tls;
mod traces;
mod undecodable;
mod validate_key;
mod validate_keys;
