//! A fresh database for each test: a SQLite file, or a database of its own on the PostgreSQL
//! server APIKEYS_TEST_DATABASE_URL names.

use sea_orm::{ConnectionTrait, Database};

/// `APIKEYS_TEST_DATABASE_URL` (a PostgreSQL server URL) runs every test on a fresh PostgreSQL
/// database; without it each test gets a fresh SQLite file.
pub(crate) const POSTGRES_ENV: &str = "APIKEYS_TEST_DATABASE_URL";

/// A fresh database for one test, dropped with it (SQLite) or left for the throwaway server.
#[derive(Debug)]
pub(crate) struct TestDb {
    pub(crate) url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// What is left in a stopped app once its database is handed back.
    pub(super) fn handed_back() -> Self {
        Self {
            url: String::new(),
            _dir: None,
        }
    }

    pub(crate) async fn new() -> Self {
        match std::env::var(POSTGRES_ENV) {
            Ok(server) if !server.is_empty() => {
                let name = format!("apikeys_test_{}", random_suffix());
                let admin = Database::connect(server.as_str())
                    .await
                    .expect("connect to the PostgreSQL test server");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create a test database");
                admin.close().await.ok();
                Self {
                    url: with_database(&server, &name),
                    _dir: None,
                }
            }
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("apikeys.db").display()
                );
                Self {
                    url,
                    _dir: Some(dir),
                }
            }
        }
    }

    /// Another handle on a database that someone else owns (a second replica, a proxy).
    pub(crate) fn sharing(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            _dir: None,
        }
    }

    /// Path of the SQLite file, for tests that read its raw bytes.
    pub(crate) fn sqlite_dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|d| d.path())
    }
}

fn random_suffix() -> String {
    apikeys::domain::KeyId::generate().as_str()[4..].to_ascii_lowercase()
}

/// `postgres://u@h:p/db?x` with `db` replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = server
        .split_once('?')
        .map_or((server, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{}", &base[..host_end], name);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}
