//! Who may call this service: the callers file and the bearer tokens it vouches for.
//!
//! A caller is another backend, not a person: an admin backend (management RPCs, and
//! ValidateKey) or a gateway (ValidateKey and Envoy's ext_authz Check only). Each presents `authorization: Bearer <token>`.
//! The file holds only the blake3 hash of each token, so reading it (or a backup of it) gives
//! no one a way in. With mutual TLS a caller may instead be known by a DNS name in its client
//! certificate's subject alternative names (the certificate verified against the client CA).
//! One caller per line:
//!
//! ```text
//! # name          role     credential
//! billing-admin   admin    blake3:5f0c…(64 hex digits)
//! edge-gateway    gateway  blake3:9a1e…
//! mesh-gateway    gateway  san:gateway.edge.svc.cluster.local
//! ```

use std::{
    collections::HashMap,
    fmt,
    path::Path,
    sync::{Arc, atomic::AtomicUsize},
};

use crate::domain::base62;

/// Prefix of every caller token, so a leaked one is recognisable (and never mistaken for an
/// API key, which starts `clo_`).
pub(crate) const TOKEN_PREFIX: &str = "cct_";
/// 43 base62 characters: 256 bits of randomness.
const TOKEN_RANDOM_LEN: usize = 43;
const HASH_PREFIX: &str = "blake3:";
const SAN_PREFIX: &str = "san:";
const NAME_MAX: usize = 64;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CallerRole {
    /// ValidateKey and Envoy's ext_authz Check only: what an API gateway needs on every
    /// request.
    Gateway,
    /// The management RPCs (on behalf of the signed-in person named in `x-actor-*` metadata)
    /// and ValidateKey.
    Admin,
}

impl CallerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for CallerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller, as the request path sees it (shared: a call's extensions hold a
/// reference, not a copy).
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    pub role: CallerRole,
    /// Calls in flight from this caller, for its fair share of the server.
    pub(crate) in_flight: AtomicUsize,
}

/// A caller's bearer token. Like an API key it never prints its value.
pub struct CallerToken(String);

impl CallerToken {
    /// A new token from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(format!(
            "{TOKEN_PREFIX}{}",
            base62::random(TOKEN_RANDOM_LEN)
        ))
    }

    /// The token itself. Call only to hand it to the caller's operator, once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `blake3:<hex>`, as written in the callers file.
    pub(crate) fn hash_line(&self) -> String {
        format!("{HASH_PREFIX}{}", blake3::hash(self.0.as_bytes()).to_hex())
    }
}

impl fmt::Debug for CallerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}****")
    }
}

/// The line to add to the callers file for `name` with `role` and `token`.
pub fn file_line(name: &str, role: CallerRole, token: &CallerToken) -> String {
    format!("{name} {role} {}", token.hash_line())
}

/// What `apikeys caller-token new` prints: a new token, on a line of its own, shown this once,
/// and the callers-file line that admits it.
pub fn new_token_instructions(name: &str, role: CallerRole) -> String {
    let token = CallerToken::generate();
    format!(
        "# New {role} token for caller `{name}`. This is the only time it will be shown: hand it to\n\
         # the caller's operator for their secret store (sent as `authorization: Bearer <token>`).\n\
         {}\n\
         # Add this line to the callers file (--callers-file / APIKEYS_CALLERS_FILE) of every\n\
         # replica; each takes it within --callers-reload-interval, or at once on SIGHUP:\n\
         {}\n",
        token.expose(),
        file_line(name, role, &token)
    )
}

/// A caller name: what logs and rate limits know a caller by.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a caller name is 1 to {NAME_MAX} characters of a-z, 0-9, '.', '_' and '-'"
        ))
    }
}

/// Every caller of the callers file, by the hash of its token.
#[derive(Clone, Default)]
pub struct Callers {
    by_hash: HashMap<[u8; 32], Arc<Caller>>,
    /// Callers known by a DNS name in their client certificate.
    by_san: Vec<(rustls::pki_types::ServerName<'static>, Arc<Caller>)>,
}

impl fmt::Debug for Callers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self
            .by_hash
            .values()
            .chain(self.by_san.iter().map(|(_, caller)| caller))
            .map(|c| c.name.as_str())
            .collect();
        names.sort_unstable();
        f.debug_struct("Callers").field("names", &names).finish()
    }
}

/// Why the callers file cannot be used. Quotes nothing from the file but caller names (which
/// cannot hold a token: they allow no capitals), in case a token was pasted in the wrong field.
#[derive(Debug, thiserror::Error)]
pub enum CallersFileError {
    #[error("cannot read the callers file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Whoever may write the file may add a caller of their own.
    #[error(
        "the callers file {path} may be written by group or others (mode {mode:03o}), who could admit any caller: run `chmod go-w {path}`"
    )]
    WritableByOthers { path: String, mode: u32 },
    #[error("callers file line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the callers file lists no callers")]
    Empty,
}

impl Callers {
    /// The file's text, refused if group or others may write it.
    pub(crate) fn read(path: &Path) -> Result<String, CallersFileError> {
        let read = |source| CallersFileError::Read {
            path: path.display().to_string(),
            source,
        };
        let bytes = crate::file_mode::read_trusted(path).map_err(|err| match err {
            crate::file_mode::TrustedFileError::Io(source) => read(source),
            crate::file_mode::TrustedFileError::WritableByOthers { mode } => {
                CallersFileError::WritableByOthers {
                    path: path.display().to_string(),
                    mode,
                }
            }
        })?;
        String::from_utf8(bytes)
            .map_err(|err| read(std::io::Error::new(std::io::ErrorKind::InvalidData, err)))
    }

    /// Carries over, from the callers `previous` listed, the count of calls in flight of
    /// each caller listed again under the same name and role.
    pub(crate) fn keep_counts_of(&mut self, previous: &Callers) {
        let known = |caller: &Arc<Caller>| {
            previous
                .by_hash
                .values()
                .chain(previous.by_san.iter().map(|(_, caller)| caller))
                .find(|old| old.name == caller.name && old.role == caller.role)
                .cloned()
        };
        for caller in self
            .by_hash
            .values_mut()
            .chain(self.by_san.iter_mut().map(|(_, caller)| caller))
        {
            if let Some(old) = known(caller) {
                *caller = old;
            }
        }
    }

    pub fn parse(text: &str) -> Result<Self, CallersFileError> {
        let mut by_hash = HashMap::new();
        let mut by_san: Vec<(rustls::pki_types::ServerName<'static>, Arc<Caller>)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (at, raw) in text.lines().enumerate() {
            let line = at + 1;
            let bad = |reason: String| CallersFileError::Line { line, reason };
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, role, credential] = fields[..] else {
                return Err(bad(
                    "expected three fields: NAME ROLE blake3:HASH (or san:DNS-NAME)".to_owned(),
                ));
            };
            check_name(name).map_err(bad)?;
            let role = <CallerRole as clap::ValueEnum>::from_str(role, false).map_err(|_| {
                bad("the role (second field) is neither gateway nor admin".to_owned())
            })?;
            if !names.insert(name.to_owned()) {
                return Err(bad(format!("caller `{name}` is listed twice")));
            }
            let caller = Arc::new(Caller {
                name: name.to_owned(),
                role,
                in_flight: AtomicUsize::new(0),
            });
            if let Some(san) = credential.strip_prefix(SAN_PREFIX) {
                let name = rustls::pki_types::ServerName::try_from(san.to_ascii_lowercase())
                    .map_err(|_| bad("the san: value is not a DNS name".to_owned()))?;
                if by_san.iter().any(|(listed, _)| *listed == name) {
                    return Err(bad("this san: name is already listed".to_owned()));
                }
                by_san.push((name, caller));
                continue;
            }
            let hash = credential
                .strip_prefix(HASH_PREFIX)
                .and_then(parse_hex32)
                .ok_or_else(|| {
                    bad("the credential is `blake3:` and 64 hex digits (the token's hash, never the token), or san:DNS-NAME".to_owned())
                })?;
            if by_hash.insert(hash, caller).is_some() {
                return Err(bad("this token hash is already listed".to_owned()));
            }
        }
        if by_hash.is_empty() && by_san.is_empty() {
            return Err(CallersFileError::Empty);
        }
        Ok(Self { by_hash, by_san })
    }

    /// The caller whose token this is, if any.
    pub(crate) fn authenticate(&self, token: &str) -> Option<&Arc<Caller>> {
        self.by_hash.get(blake3::hash(token.as_bytes()).as_bytes())
    }

    /// The caller a client certificate names in its subject alternative names, if any. The
    /// certificate must already be verified (mutual TLS against the client CA).
    pub(crate) fn authenticate_certificate(
        &self,
        certificate: &rustls::pki_types::CertificateDer<'_>,
    ) -> Option<&Arc<Caller>> {
        let certificate = webpki::EndEntityCert::try_from(certificate).ok()?;
        self.by_san.iter().find_map(|(name, caller)| {
            certificate
                .verify_is_valid_for_subject_name(name)
                .ok()
                .map(|()| caller)
        })
    }

    /// Whether any caller is known by certificate, which only mutual TLS can present.
    pub(crate) fn names_certificates(&self) -> bool {
        !self.by_san.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_hash.len() + self.by_san.len()
    }
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn any_set_of_callers_written_as_lines_reads_back(
            names in proptest::collection::hash_set("[a-z0-9][a-z0-9._-]{0,20}", 1..8),
            gateways in any::<u8>(),
        ) {
            let entries: Vec<(String, CallerRole, CallerToken)> = names
                .into_iter()
                .enumerate()
                .map(|(i, name)| {
                    let role = if gateways >> (i % 8) & 1 == 1 { CallerRole::Gateway } else { CallerRole::Admin };
                    (name, role, CallerToken::generate())
                })
                .collect();
            let text: String = entries
                .iter()
                .map(|(name, role, token)| format!("{}  # {name}\n", file_line(name, *role, token)))
                .collect();

            let callers = Callers::parse(&text).unwrap();

            prop_assert_eq!(callers.len(), entries.len());
            for (name, role, token) in &entries {
                let caller = callers.authenticate(token.expose()).unwrap();
                prop_assert_eq!(&caller.name, name);
                prop_assert_eq!(caller.role, *role);
            }
        }

        #[test]
        fn any_text_either_parses_or_names_a_line_without_quoting_credentials(text in "\\PC{0,200}") {
            if let Err(err) = Callers::parse(&text) {
                let message = err.to_string();
                for word in text.split_whitespace().filter(|w| w.len() >= 16 && check_name(w).is_err()) {
                    prop_assert!(!message.contains(word), "{}", message);
                }
            }
        }
    }

    #[test]
    fn a_generated_token_authenticates_through_its_file_line() {
        let token = CallerToken::generate();
        let text = format!(
            "# callers\n{}\n\n",
            file_line("billing-admin", CallerRole::Admin, &token)
        );

        let callers = Callers::parse(&text).unwrap();

        let caller = callers.authenticate(token.expose()).unwrap();
        assert_eq!(caller.name, "billing-admin");
        assert_eq!(caller.role, CallerRole::Admin);
        assert!(callers.authenticate("cct_not-a-token").is_none());
        assert!(
            !text.contains(token.expose()),
            "the file holds only the hash"
        );
    }

    #[test]
    fn tokens_are_unique_and_never_printed() {
        let (a, b) = (CallerToken::generate(), CallerToken::generate());
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(a.expose().len(), TOKEN_PREFIX.len() + TOKEN_RANDOM_LEN);
        assert_eq!(format!("{a:?}"), "cct_****");
    }

    #[cfg(unix)]
    #[test]
    fn a_callers_file_group_or_others_may_write_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers");
        let line = file_line("edge", CallerRole::Gateway, &CallerToken::generate());
        std::fs::write(&path, format!("{line}\n")).unwrap();
        for mode in [0o666, 0o664, 0o646] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();

            let err = Callers::read(&path).unwrap_err().to_string();

            let fix = format!("chmod go-w {}", path.display());
            assert!(err.contains(&fix), "{err:?} should say {fix:?}");
            assert!(err.contains(&format!("{mode:o}")), "{err:?}");
        }
        for mode in [0o600, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let text = Callers::read(&path).unwrap();
            assert_eq!(Callers::parse(&text).unwrap().len(), 1, "{mode:o}");
        }
    }

    #[test]
    fn a_bad_line_is_reported_by_number_without_its_content() {
        let token = CallerToken::generate();
        let good = file_line("edge", CallerRole::Gateway, &token);
        for (text, expected) in [
            (format!("{good}\nedge2 gateway"), "line 2"),
            (
                format!("{good}\nEdge admin {}", token.hash_line()),
                "line 2",
            ),
            (
                format!("x owner {}", token.hash_line()),
                "neither gateway nor admin",
            ),
            ("x admin blake3:abc".to_owned(), "64 hex digits"),
            ("x admin san:not@a-name".to_owned(), "not a DNS name"),
            (
                "x admin san:gw.example\ny gateway san:GW.example".to_owned(),
                "already listed",
            ),
            (format!("x admin {}", token.expose()), "never the token"),
            (format!("{good}\n{good}"), "listed twice"),
            (
                format!("{good}\nother admin {}", token.hash_line()),
                "already listed",
            ),
            ("# nobody\n".to_owned(), "no callers"),
        ] {
            let err = Callers::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} should say {expected:?}");
            assert!(!err.contains(token.expose()));
        }
    }
}
