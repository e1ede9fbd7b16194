//! The SQLite database file, made private before SQLite opens it: it and its `-wal` and `-shm`
//! hold names, workspace and actor ids, client IPs.

use std::{path::Path, str::FromStr};

use sea_orm::sqlx::sqlite::SqliteConnectOptions;

/// What [`prepare`] found at a database URL.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DatabaseFile {
    /// No file of ours: another backend, an in-memory database, a SQLite `file:` URI.
    NotAFile,
    /// Missing, and the URL does not ask to create it (`mode=rw`/`ro`): SQLite will say so.
    Missing,
    /// Created here, empty, mode 0600.
    Created,
    /// There already, with these permission bits, which it keeps.
    Existing { mode: u32 },
}

/// Creates a `mode=rwc` database that does not exist yet as an empty file of mode 0600 (set
/// explicitly, so whatever the umask): SQLite gives `-wal` and `-shm` the database file's
/// mode, so they are 0600 too, where SQLite alone makes all three 0644. An existing file keeps
/// its mode, with a warning if group or others may read it. The file name is the one sqlx's
/// own parser will open.
pub(super) fn prepare(url: &str) -> std::io::Result<DatabaseFile> {
    let Some(options) = url
        .starts_with("sqlite:")
        .then(|| SqliteConnectOptions::from_str(url).ok())
        .flatten()
    else {
        // Not SQLite, or a URL sqlx will refuse with its own message.
        return Ok(DatabaseFile::NotAFile);
    };
    // sqlx keeps the mode to itself (and its `to_url_lossy` panics on some file names), but
    // having parsed the URL it vouches that the query holds only its known `key=value` pairs;
    // as in sqlx, the last `mode` wins.
    let mode = url
        .split_once('?')
        .and_then(|(_, query)| {
            query
                .rsplit('&')
                .find_map(|pair| pair.strip_prefix("mode="))
        })
        .unwrap_or("rw");
    let path = options.get_filename();
    // `:memory:` becomes a `file:` name, and SQLite reads any `file:` name as a URI.
    let uri = path.to_str().is_some_and(|p| p.starts_with("file:"));
    if mode == "memory" || uri || path.as_os_str().is_empty() {
        return Ok(DatabaseFile::NotAFile);
    }
    if path.exists() {
        return existing(path);
    }
    if mode != "rwc" {
        return Ok(DatabaseFile::Missing);
    }
    create_private(path)
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<DatabaseFile> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(file) => {
            // The umask may have taken more than group and others' bits off 0600.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(DatabaseFile::Created)
        }
        // Another replica (or `apikeys migrate`) starting at once got there first.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => existing(path),
        Err(err) => Err(std::io::Error::new(
            err.kind(),
            format!(
                "cannot create the SQLite database {}: {err}",
                path.display()
            ),
        )),
    }
}

#[cfg(not(unix))]
fn create_private(_path: &Path) -> std::io::Result<DatabaseFile> {
    Ok(DatabaseFile::Missing)
}

#[cfg(unix)]
fn existing(path: &Path) -> std::io::Result<DatabaseFile> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:03o}"),
            "group or others may read the SQLite database (key names, workspace and actor ids, \
             client IPs): run `chmod 600 {}`; its -wal and -shm files take its mode when next created",
            path.display()
        );
    }
    Ok(DatabaseFile::Existing { mode })
}

#[cfg(not(unix))]
fn existing(_path: &Path) -> std::io::Result<DatabaseFile> {
    Ok(DatabaseFile::Existing { mode: 0 })
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_database_file_is_created_empty_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apikeys.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());

        assert_eq!(prepare(&url).unwrap(), DatabaseFile::Created);

        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn an_existing_database_file_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apikeys.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let url = format!("sqlite://{}?mode=rwc", path.display());

        assert_eq!(
            prepare(&url).unwrap(),
            DatabaseFile::Existing { mode: 0o644 }
        );

        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn a_database_the_url_does_not_ask_to_create_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("apikeys.db");
        for url in [
            format!("sqlite://{}", path.display()),
            format!("sqlite://{}?mode=rw", path.display()),
            format!("sqlite://{}?mode=ro", path.display()),
        ] {
            assert_eq!(prepare(&url).unwrap(), DatabaseFile::Missing, "{url}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn in_memory_and_other_databases_have_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("shared");
        for url in [
            "sqlite::memory:".to_owned(),
            "sqlite://:memory:".to_owned(),
            format!("sqlite://{}?mode=memory", named.display()),
            "postgres://user@localhost/apikeys".to_owned(),
        ] {
            assert_eq!(prepare(&url).unwrap(), DatabaseFile::NotAFile, "{url}");
        }
        assert!(!named.exists());
    }

    #[test]
    fn a_database_that_cannot_be_created_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("apikeys.db");

        let err = prepare(&format!("sqlite://{}?mode=rwc", path.display())).unwrap_err();

        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
