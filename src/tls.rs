//! TLS on the gRPC and HTTP listeners, with rustls.
//!
//! The certificate, key and client CA come from PEM files ([`crate::config::Tls`]).
//! [`Certificates`] re-reads them when they change on disk (modification time,
//! size or inode: cert-manager and kubelet swap a Secret volume's files by a
//! symlink), so new connections get a rotated certificate without a restart;
//! connections already open keep theirs. Files that do not load (half-written,
//! a key that does not match the certificate) are logged and the previous
//! certificate stays in use until they do.
//!
//! [`handshakes`] runs the TLS handshakes of accepted connections in tasks of
//! their own, so one slow or silent client never holds up the accept loop, and
//! yields [`MaybeTls`] connections, which keep the TCP peer address (tonic's
//! `Connected`) for the loopback exemption of [`crate::auth`].

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::Tls;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors loading the TLS files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("client CA {path}: {source}")]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {cert} with key {key}: {source}")]
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// Whether a listener asks clients for a certificate when a client CA is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Refuse clients without a certificate signed by the client CA (gRPC).
    Required,
    /// Accept clients without one, verify one that is presented (HTTP: probes,
    /// Prometheus and browsers have none; the API asks for a token anyway).
    Optional,
}

/// What the files looked like when last read: (modified, length, inode) each.
type Stamp = Vec<Option<(Option<SystemTime>, u64, u64)>>;

fn stamp(files: &Tls) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut paths = vec![&files.cert_file, &files.key_file];
    paths.extend(files.client_ca_file.as_ref());
    paths
        .into_iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len(), m.ino()))
        })
        .collect()
}

struct Current {
    stamp: Stamp,
    config: Arc<ServerConfig>,
    /// The stamp of files that did not load: not tried again until they change.
    failed: Option<Stamp>,
}

/// A listener's rustls configuration, rebuilt when its files change.
pub struct Certificates {
    files: Tls,
    alpn: Vec<Vec<u8>>,
    client_certs: ClientCerts,
    current: Mutex<Current>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .field("client_certs", &self.client_certs)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn build(
    files: &Tls,
    alpn: &[Vec<u8>],
    client_certs: ClientCerts,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(&files.cert_file)?;
    let key_pem = read(&files.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        path: files.key_file.clone(),
        reason: e.to_string(),
    })?;
    let rustls_error = |source| TlsError::Rustls {
        cert: files.cert_file.clone(),
        key: files.key_file.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?;
    let builder = match &files.client_ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(path)? {
                roots.add(ca).map_err(rustls_error)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = match client_certs {
                ClientCerts::Required => verifier,
                ClientCerts::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|source| TlsError::ClientCa {
                path: path.clone(),
                source,
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // Checks that the key belongs to the certificate.
    let mut config = builder.with_single_cert(chain, key).map_err(rustls_error)?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

impl Certificates {
    /// Loads the files now; an error here stops start-up.
    pub fn load(files: &Tls, alpn: &[&[u8]], client_certs: ClientCerts) -> Result<Self, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let stamp = stamp(files);
        let config = Arc::new(build(files, &alpn, client_certs)?);
        Ok(Self {
            files: files.clone(),
            alpn,
            client_certs,
            current: Mutex::new(Current {
                stamp,
                config,
                failed: None,
            }),
        })
    }

    /// The configuration for a new connection: rebuilt first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let now = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now == current.stamp || current.failed.as_ref() == Some(&now) {
            return Arc::clone(&current.config);
        }
        match build(&self.files, &self.alpn, self.client_certs) {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                current.config = Arc::new(config);
                current.stamp = now;
                current.failed = None;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the TLS files changed but do not load; serving the previous certificate"
                );
                current.failed = Some(now);
            }
        }
        Arc::clone(&current.config)
    }
}

/// A connection in the clear or in TLS.
#[derive(Debug)]
pub enum MaybeTls<IO> {
    Plain(IO),
    Tls(Box<tokio_rustls::server::TlsStream<IO>>),
}

impl<IO> MaybeTls<IO> {
    /// The underlying connection.
    pub fn inner(&self) -> &IO {
        match self {
            MaybeTls::Plain(io) => io,
            MaybeTls::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for MaybeTls<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner().connect_info()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

type Handshake<IO> = tokio::task::JoinSet<io::Result<tokio_rustls::server::TlsStream<IO>>>;

struct Accepting<S, IO> {
    incoming: Pin<Box<S>>,
    certificates: Option<Arc<Certificates>>,
    handshakes: Handshake<IO>,
    incoming_done: bool,
}

/// `incoming` connections, in TLS when `certificates` is given: each handshake
/// runs in a task of its own (within [`HANDSHAKE_TIMEOUT`]), and connections come
/// out as their handshakes finish. A failed handshake (a plain-text client, a
/// client without a required certificate) closes that connection and is logged
/// at debug level; accept errors pass through.
pub fn handshakes<S, IO>(
    incoming: S,
    certificates: Option<Arc<Certificates>>,
) -> impl Stream<Item = io::Result<MaybeTls<IO>>> + Send
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Accepting {
        incoming: Box::pin(incoming),
        certificates,
        handshakes: tokio::task::JoinSet::new(),
        incoming_done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            tokio::select! {
                joined = s.handshakes.join_next(), if !s.handshakes.is_empty() => match joined {
                    Some(Ok(Ok(tls))) => return Some((Ok(MaybeTls::Tls(Box::new(tls))), s)),
                    Some(Ok(Err(e))) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Some(Err(e)) => tracing::debug!(error = %e, "TLS handshake task ended"),
                    None => {}
                },
                next = s.incoming.next(), if !s.incoming_done => match next {
                    Some(Ok(io)) => match &s.certificates {
                        None => return Some((Ok(MaybeTls::Plain(io)), s)),
                        Some(certificates) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(certificates.current());
                            s.handshakes.spawn(async move {
                                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io))
                                    .await
                                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
                            });
                        }
                    },
                    Some(Err(e)) => return Some((Err(e), s)),
                    None => s.incoming_done = true,
                },
                else => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let files = Tls {
            cert_file: dir.path().join("missing.crt"),
            key_file: dir.path().join("missing.key"),
            client_ca_file: None,
        };
        let err = Certificates::load(&files, &[b"h2"], ClientCerts::Required).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");
        std::fs::write(&files.cert_file, "not a certificate").unwrap();
        let err = Certificates::load(&files, &[b"h2"], ClientCerts::Required).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    }
}
