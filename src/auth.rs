//! Who may do what: bearer tokens with scopes and namespaces.
//!
//! Clients send `authorization: Bearer <token>` (gRPC metadata, or the HTTP header
//! of the same name). Authentication happens first, from the header and the peer
//! address alone, before a request is decoded or any experiment looked up: no token
//! is UNAUTHENTICATED (401), whether or not the experiment exists. Authorization
//! comes once the request's namespace is known (CreateExperiment and
//! ListExperiments carry it; other requests name an experiment, whose namespace
//! comes from the index): a token outside its scope or namespaces is
//! PERMISSION_DENIED (403), naming the namespace.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time against
//! every configured token; neither they nor their digests are ever logged.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{self, ConfigError, Namespaces, Scope, TokenConfig, TokenValue};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token, and no exemption applies. UNAUTHENTICATED / 401.
    #[error("a bearer token is required (authorization: Bearer <token>)")]
    MissingToken,
    /// A token (or an authorization header) that is not a configured token.
    /// UNAUTHENTICATED / 401.
    #[error("the bearer token is not valid")]
    InvalidToken,
    /// A valid token outside its scopes or namespaces. PERMISSION_DENIED / 403.
    #[error("token may not {scope} namespace {namespace}")]
    NamespaceDenied { scope: Scope, namespace: String },
    /// A valid token without the scope at all. PERMISSION_DENIED / 403.
    #[error("token may not {scope}")]
    ScopeDenied { scope: Scope },
    /// With authentication off, the HTTP API serves loopback clients only. 403.
    #[error("the API serves loopback clients only unless [auth] is enabled")]
    LoopbackOnly,
}

impl AuthError {
    /// UNAUTHENTICATED (401) rather than PERMISSION_DENIED (403).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, AuthError::MissingToken | AuthError::InvalidToken)
    }
}

/// Errors loading the token table at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthSetupError {
    #[error("reading token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token {name}: {path} is empty")]
    EmptyFile { name: String, path: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What one configured token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scopes: BTreeSet<Scope>,
    pub namespaces: Namespaces,
}

impl Grant {
    fn allows(&self, scope: Scope, namespace: &str) -> bool {
        self.scopes.contains(&scope) && self.namespaces.contains(namespace)
    }
}

/// Who is asking, once authenticated.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Authentication is off: everyone may do everything (gRPC only).
    Anyone,
    /// A loopback client without a token, let in by
    /// `allow_unauthenticated_loopback` (or, with authentication off, a loopback
    /// client of the HTTP API).
    Loopback,
    /// A client with a configured token: the union of every entry with that token.
    Token {
        name: Arc<str>,
        grants: Arc<[Grant]>,
    },
}

/// The namespaces a principal may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    All,
    Only(BTreeSet<String>),
}

impl Principal {
    /// May this principal do `scope` in `namespace`?
    pub fn allow(&self, scope: Scope, namespace: &str) -> Result<(), AuthError> {
        match self {
            Principal::Anyone | Principal::Loopback => Ok(()),
            Principal::Token { grants, .. }
                if grants.iter().any(|g| g.allows(scope, namespace)) =>
            {
                Ok(())
            }
            Principal::Token { .. } => Err(AuthError::NamespaceDenied {
                scope,
                namespace: namespace.to_owned(),
            }),
        }
    }

    /// May this principal do `scope` in some namespace? (For what belongs to no
    /// namespace, such as the HTTP health figures.)
    pub fn allow_any(&self, scope: Scope) -> Result<(), AuthError> {
        match self {
            Principal::Anyone | Principal::Loopback => Ok(()),
            Principal::Token { grants, .. } if grants.iter().any(|g| g.scopes.contains(&scope)) => {
                Ok(())
            }
            Principal::Token { .. } => Err(AuthError::ScopeDenied { scope }),
        }
    }

    /// The namespaces this principal may read.
    pub fn readable(&self) -> Visible {
        let Principal::Token { grants, .. } = self else {
            return Visible::All;
        };
        let mut only = BTreeSet::new();
        for g in grants.iter().filter(|g| g.scopes.contains(&Scope::Read)) {
            match &g.namespaces {
                Namespaces::All => return Visible::All,
                Namespaces::Only(set) => only.extend(set.iter().cloned()),
            }
        }
        Visible::Only(only)
    }

    /// A name for logs: the token's configured name, never the token.
    pub fn label(&self) -> &str {
        match self {
            Principal::Anyone => "anyone",
            Principal::Loopback => "loopback",
            Principal::Token { name, .. } => name,
        }
    }
}

struct Entry {
    name: Arc<str>,
    digest: [u8; 32],
    grant: Grant,
}

/// The token table and the policy around it.
pub struct Authorizer {
    enabled: bool,
    loopback_exempt: bool,
    tokens: Vec<Entry>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("enabled", &self.enabled)
            .field("loopback_exempt", &self.loopback_exempt)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Compares two digests without revealing where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Is this peer on loopback (IPv4-mapped IPv6 included)? An unknown peer is not.
pub fn is_loopback(peer: Option<SocketAddr>) -> bool {
    peer.is_some_and(|p| p.ip().to_canonical().is_loopback())
}

/// The token of an `authorization` header value: `Bearer <token>` (the scheme in
/// any case). `Ok(None)`: no header. A header that is not a bearer token is
/// [`AuthError::InvalidToken`].
pub fn bearer(header: Option<&[u8]>) -> Result<Option<&str>, AuthError> {
    let Some(header) = header else {
        return Ok(None);
    };
    let text = std::str::from_utf8(header).map_err(|_| AuthError::InvalidToken)?;
    let (scheme, token) = text.trim().split_once(' ').ok_or(AuthError::InvalidToken)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::InvalidToken);
    }
    Ok(Some(token))
}

impl Authorizer {
    /// The table of `auth`, token files read now.
    pub fn load(auth: &config::Auth) -> Result<Self, AuthSetupError> {
        let mut configured: Vec<TokenConfig> = auth.tokens.clone();
        if let Some(path) = &auth.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
                path: path.clone(),
                source,
            })?;
            configured.extend(config::parse_tokens_file(path, &text)?);
        }
        let mut tokens = Vec::with_capacity(configured.len());
        for t in configured {
            let value = match &t.value {
                TokenValue::Inline(secret) => secret.0.clone(),
                TokenValue::File(path) => {
                    let text =
                        std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    let value = text.trim().to_owned();
                    if value.is_empty() {
                        return Err(AuthSetupError::EmptyFile {
                            name: t.name.clone(),
                            path: path.clone(),
                        });
                    }
                    value
                }
            };
            tokens.push(Entry {
                name: Arc::from(t.name.as_str()),
                digest: digest(value.as_bytes()),
                grant: Grant {
                    scopes: t.scopes,
                    namespaces: t.namespaces,
                },
            });
        }
        Ok(Self {
            enabled: auth.enabled,
            loopback_exempt: auth.allow_unauthenticated_loopback,
            tokens,
        })
    }

    /// Authentication off: every client may do everything.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            loopback_exempt: true,
            tokens: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Tokens configured (for the start-up log line).
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The principal a token names, or [`AuthError::InvalidToken`]. Every entry is
    /// compared, whichever matches.
    fn lookup(&self, token: &str) -> Result<Principal, AuthError> {
        let presented = digest(token.as_bytes());
        let mut name = None;
        let mut grants = Vec::new();
        for e in &self.tokens {
            if same(&presented, &e.digest) {
                name.get_or_insert_with(|| Arc::clone(&e.name));
                grants.push(e.grant.clone());
            }
        }
        match name {
            Some(name) => Ok(Principal::Token {
                name,
                grants: grants.into(),
            }),
            None => Err(AuthError::InvalidToken),
        }
    }

    /// Who a gRPC request comes from, given its peer and its `authorization`
    /// metadata. With authentication off, anyone.
    pub fn authenticate(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<Principal, AuthError> {
        if !self.enabled {
            return Ok(Principal::Anyone);
        }
        match bearer(authorization)? {
            Some(token) => self.lookup(token),
            None if self.loopback_exempt && is_loopback(peer) => Ok(Principal::Loopback),
            None => Err(AuthError::MissingToken),
        }
    }

    /// Who an HTTP API request comes from. With authentication off, the API
    /// serves loopback clients only (as it always has: it was never meant to be
    /// open to the network without a token).
    pub fn authenticate_http(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<Principal, AuthError> {
        if !self.enabled {
            return if is_loopback(peer) {
                Ok(Principal::Loopback)
            } else {
                Err(AuthError::LoopbackOnly)
            };
        }
        self.authenticate(peer, authorization)
    }

    /// Authentication and authorization in one: may a client on loopback (or not)
    /// with this bearer token do `scope` in `namespace` (or, `None`, in some
    /// namespace)?
    pub fn check(
        &self,
        peer_is_loopback: bool,
        bearer: Option<&str>,
        scope: Scope,
        namespace: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let peer = peer_is_loopback.then(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let header = bearer.map(|t| format!("Bearer {t}"));
        let who = self.authenticate(peer, header.as_deref().map(str::as_bytes))?;
        match namespace {
            Some(ns) => who.allow(scope, ns)?,
            None => who.allow_any(scope)?,
        }
        Ok(who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Auth, Secret};

    fn token(name: &str, value: &str, scopes: &[Scope], namespaces: &[&str]) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            value: TokenValue::Inline(Secret(value.into())),
            scopes: scopes.iter().copied().collect(),
            namespaces: if namespaces == ["*"] {
                Namespaces::All
            } else {
                Namespaces::Only(namespaces.iter().map(|s| s.to_string()).collect())
            },
        }
    }

    fn table(loopback: bool) -> Authorizer {
        Authorizer::load(&Auth {
            enabled: true,
            allow_unauthenticated_loopback: loopback,
            tokens: vec![
                token("all", "t-all", &[Scope::Read, Scope::Write], &["*"]),
                token("reader", "t-read", &[Scope::Read], &["*"]),
                token("cv", "t-cv", &[Scope::Read, Scope::Write], &["cv"]),
                // A second entry for the same token adds to its grants.
                token("cv+read-nlp", "t-cv", &[Scope::Read], &["nlp"]),
            ],
            tokens_file: None,
        })
        .unwrap()
    }

    #[test]
    fn the_matrix() {
        let a = table(false);
        use Scope::*;
        assert_eq!(
            a.check(false, None, Write, Some("cv")).unwrap_err(),
            AuthError::MissingToken
        );
        assert_eq!(
            a.check(false, Some("nope"), Read, Some("cv")).unwrap_err(),
            AuthError::InvalidToken
        );
        assert!(a.check(false, Some("t-all"), Write, Some("nlp")).is_ok());
        assert_eq!(
            a.check(false, Some("t-read"), Write, Some("cv"))
                .unwrap_err()
                .to_string(),
            "token may not write namespace cv"
        );
        assert!(a.check(false, Some("t-read"), Read, Some("nlp")).is_ok());
        assert!(a.check(false, Some("t-cv"), Write, Some("cv")).is_ok());
        assert_eq!(
            a.check(false, Some("t-cv"), Write, Some("nlp"))
                .unwrap_err()
                .to_string(),
            "token may not write namespace nlp"
        );
        assert!(a.check(false, Some("t-cv"), Read, Some("nlp")).is_ok());
        assert_eq!(
            a.check(false, Some("t-cv"), Read, Some("speech"))
                .unwrap_err()
                .to_string(),
            "token may not read namespace speech"
        );
        // Loopback without a token: only with the exemption.
        assert_eq!(
            a.check(true, None, Write, Some("cv")).unwrap_err(),
            AuthError::MissingToken
        );
        let exempt = table(true);
        assert!(exempt.check(true, None, Write, Some("nlp")).is_ok());
        assert!(matches!(
            exempt.check(false, None, Read, None),
            Err(AuthError::MissingToken)
        ));
        // A loopback client that sends a token is held to it.
        assert!(
            exempt
                .check(true, Some("t-read"), Write, Some("cv"))
                .is_err()
        );
        assert!(exempt.check(true, Some("bad"), Read, None).is_err());
    }

    #[test]
    fn visibility_and_headers() {
        let a = table(false);
        let who = a.authenticate(None, Some(b"Bearer t-cv")).unwrap();
        assert_eq!(
            who.readable(),
            Visible::Only(["cv".to_string(), "nlp".to_string()].into())
        );
        assert_eq!(who.label(), "cv");
        let reader = a.authenticate(None, Some(b"bearer  t-read ")).unwrap();
        assert_eq!(reader.readable(), Visible::All);
        for bad in [
            &b"Basic dXNlcg=="[..],
            b"Bearer",
            b"Bearer ",
            b"t-all",
            b"\xff",
        ] {
            assert_eq!(
                a.authenticate(None, Some(bad)).unwrap_err(),
                AuthError::InvalidToken,
                "{bad:?}"
            );
        }
        assert_eq!(
            Authorizer::disabled()
                .authenticate_http(Some("10.0.0.1:1".parse().unwrap()), None)
                .unwrap_err(),
            AuthError::LoopbackOnly
        );
        assert!(matches!(
            Authorizer::disabled().authenticate(Some("10.0.0.1:1".parse().unwrap()), None),
            Ok(Principal::Anyone)
        ));
        assert!(is_loopback(Some("[::ffff:127.0.0.1]:1".parse().unwrap())));
        assert!(is_loopback(Some("[::1]:1".parse().unwrap())));
        assert!(!is_loopback(Some("192.0.2.1:1".parse().unwrap())));
        assert!(!is_loopback(None));
    }

    #[test]
    fn token_files_are_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trainer");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let tokens_file = dir.path().join("tokens.toml");
        std::fs::write(
            &tokens_file,
            "[[tokens]]\nname = \"ci\"\ntoken = \"from-table\"\nscopes = [\"read\"]\nnamespaces = [\"cv\"]\n",
        )
        .unwrap();
        let mut t = token("trainer", "", &[Scope::Write], &["*"]);
        t.value = TokenValue::File(file.clone());
        let a = Authorizer::load(&Auth {
            enabled: true,
            allow_unauthenticated_loopback: false,
            tokens: vec![t.clone()],
            tokens_file: Some(tokens_file),
        })
        .unwrap();
        assert_eq!(a.token_count(), 2);
        assert!(
            a.check(false, Some("s3cret-from-file"), Scope::Write, Some("x"))
                .is_ok()
        );
        assert!(
            a.check(false, Some("from-table"), Scope::Read, Some("cv"))
                .is_ok()
        );
        let shown = format!("{a:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("from-table"),
            "{shown}"
        );

        std::fs::write(&file, "  \n").unwrap();
        let err = Authorizer::load(&Auth {
            enabled: true,
            allow_unauthenticated_loopback: false,
            tokens: vec![t],
            tokens_file: None,
        })
        .unwrap_err();
        assert!(matches!(err, AuthSetupError::EmptyFile { .. }), "{err}");
    }
}
