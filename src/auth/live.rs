//! The callers file in force, reloaded without a restart: on SIGHUP, and whenever its
//! contents change (checked every `--callers-reload-interval`, which is how a Kubernetes
//! Secret's update arrives). A file that fails to load is logged and the callers in force
//! stay, so a broken edit cannot lock every backend out.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::Duration,
};

use tokio::task::JoinHandle;

use super::{Callers, CallersFileError};

#[derive(Debug)]
pub(crate) struct LiveCallers {
    path: PathBuf,
    /// Whether client certificates are verified, without which `san:` callers are refused.
    mutual_tls: bool,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    callers: Callers,
    text: String,
}

/// Why a callers file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    File(#[from] CallersFileError),
    #[error(
        "the callers file names callers by certificate (san:), which needs mutual TLS: set --tls-client-ca"
    )]
    CertificatesWithoutMutualTls,
}

impl LiveCallers {
    /// Loads the file; a problem with it stops the start-up.
    pub(crate) fn load(path: PathBuf, mutual_tls: bool) -> Result<Self, ReloadError> {
        let loaded = read(&path, mutual_tls)?;
        Ok(Self {
            path,
            mutual_tls,
            current: RwLock::new(loaded),
        })
    }

    /// The callers in force now.
    pub(crate) fn current(&self) -> CurrentCallers<'_> {
        CurrentCallers(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Takes the file again if its contents changed (or if `force`); returns whether it did.
    /// On error the callers in force stay. A caller listed before and after keeps its count
    /// of calls in flight, so a reload does not hand anyone a fresh share.
    pub(crate) fn reload(&self, force: bool) -> Result<bool, ReloadError> {
        let text = Callers::read(&self.path)?;
        if !force && self.current().0.text == text {
            return Ok(false);
        }
        let mut loaded = parse(text, self.mutual_tls)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loaded.callers.keep_counts_of(&current.callers);
        *current = loaded;
        Ok(true)
    }

    /// Reloads on SIGHUP and whenever the file's contents change (checked every `poll`),
    /// until the task is aborted.
    pub(crate) fn watch(self: &Arc<Self>, poll: Duration) -> JoinHandle<()> {
        let live = self.clone();
        crate::reload::watch(poll, move |force| match live.reload(force) {
            Ok(true) => {
                let callers = live.current().0.callers.len();
                tracing::info!(callers, "callers file reloaded");
            }
            Ok(false) => {}
            Err(err) => tracing::error!(
                error = %err,
                "callers file reload failed; the callers in force stay"
            ),
        })
    }
}

/// A read of the callers in force, held while one call is authenticated.
pub(crate) struct CurrentCallers<'a>(RwLockReadGuard<'a, Loaded>);

impl std::ops::Deref for CurrentCallers<'_> {
    type Target = Callers;

    fn deref(&self) -> &Callers {
        &self.0.callers
    }
}

fn read(path: &std::path::Path, mutual_tls: bool) -> Result<Loaded, ReloadError> {
    parse(Callers::read(path)?, mutual_tls)
}

fn parse(text: String, mutual_tls: bool) -> Result<Loaded, ReloadError> {
    let callers = Callers::parse(&text)?;
    if callers.names_certificates() && !mutual_tls {
        return Err(ReloadError::CertificatesWithoutMutualTls);
    }
    Ok(Loaded { callers, text })
}
