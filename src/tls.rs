//! TLS with rustls, optionally mutual, with certificates that can be replaced while serving.
//!
//! Each accepted connection handshakes with the configuration current at that moment; a
//! reload (SIGHUP, or a change of the files' contents, which is how Kubernetes and
//! cert-manager rotate a mounted Secret) swaps it for new connections only, so open
//! connections and their calls carry on. A reload that fails keeps the old configuration.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// Where the server's certificate chain, its key and (for mutual TLS) the CA that signs
/// client certificates are read from. PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The TLS configuration in force, and the file contents it was built from.
#[derive(Debug)]
pub(crate) struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    contents: Vec<Vec<u8>>,
}

impl ReloadableTls {
    /// Loads the files; a problem with them stops the start-up.
    pub(crate) fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let loaded = build(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(loaded),
        })
    }

    pub(crate) fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Builds a new configuration from the files if their contents changed (or if `force`);
    /// returns whether it did. On error the configuration in force stays.
    pub(crate) fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let contents = read_all(&self.files)?;
        if !force && self.read().contents == contents {
            return Ok(false);
        }
        let loaded = build(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An acceptor with the configuration in force now (src/net/ runs the handshakes).
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.read().config.clone())
    }

    /// Reloads on SIGHUP and whenever the files' contents change (checked every `poll`),
    /// until the task is aborted.
    pub(crate) fn watch(self: &Arc<Self>, poll: Duration) -> JoinHandle<()> {
        let tls = self.clone();
        crate::reload::watch(poll, move |force| match tls.reload(force) {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(err) => tracing::error!(
                error = %err,
                "TLS reload failed; still serving the previous certificate"
            ),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    })
}

/// The private key is read only if no one but its owner may write it: whoever can replace it
/// can impersonate this server.
fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    use crate::file_mode::{TrustedFileError, read_trusted};
    read_trusted(path).map_err(|err| TlsError::Read {
        path: path.display().to_string(),
        reason: match err {
            TrustedFileError::Io(err) => err.to_string(),
            TrustedFileError::WritableByOthers { mode } => format!(
                "group or others may write this private key (mode {mode:03o}): run `chmod go-w {}`",
                path.display()
            ),
        },
    })
}

fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut contents = vec![read(&files.cert)?, read_key(&files.key)?];
    if let Some(ca) = &files.client_ca {
        contents.push(read(ca)?);
    }
    Ok(contents)
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Read {
            path: path.display().to_string(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let contents = read_all(files)?;
    let chain = certificates(&files.cert, &contents[0])?;
    // The key's own parse error could quote key material: say only what went wrong where.
    let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|_| TlsError::Read {
        path: files.key.display().to_string(),
        reason: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".to_owned(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError::Config(err.to_string()))?;
    let builder = match (&files.client_ca, contents.get(2)) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(path, pem)? {
                roots
                    .add(ca)
                    .map_err(|err| TlsError::Config(format!("client CA: {err}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| TlsError::Config(format!("client CA: {err}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| TlsError::Config(err.to_string()))?;
    // gRPC runs over HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        contents,
    })
}
