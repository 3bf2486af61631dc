//! A test PKI made at test time (rcgen), TLS clients for gRPC and HTTP, and a
//! raw HTTP/1.1 GET that works over both.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mboxd::proto::model_store_client::ModelStoreClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

use super::Client;

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(
        &self,
        names: &[String],
        cn: &str,
        serial: u64,
        usage: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names.to_vec()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for localhost, 127.0.0.1 and `ip`.
    pub fn server(&self, ip: IpAddr, cn: &str, serial: u64) -> Leaf {
        let names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            ip.to_string(),
        ];
        self.leaf(&names, cn, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(&[], cn, 7, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes a server certificate and key (and the CA, as the client CA) into `dir`;
/// returns the [`mboxd::config::Tls`] naming them.
pub fn write_server_files(dir: &Path, leaf: &Leaf, client_ca: Option<&Ca>) -> mboxd::config::Tls {
    let cert_file = dir.join("tls.crt");
    let key_file = dir.join("tls.key");
    std::fs::write(&cert_file, &leaf.cert_pem).expect("write cert");
    std::fs::write(&key_file, &leaf.key_pem).expect("write key");
    let client_ca_file = client_ca.map(|ca| {
        let path: PathBuf = dir.join("ca.crt");
        std::fs::write(&path, &ca.pem).expect("write CA");
        path
    });
    mboxd::config::Tls {
        cert_file,
        key_file,
        client_ca_file,
    }
}

/// A rustls client trusting `ca`, offering `alpn`, with an optional client
/// certificate.
pub fn client_config(ca: &Ca, alpn: &[u8], identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr`, checking the certificate for `server_name`.
pub async fn connect_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate a TLS server at `addr` presents to a new connection.
pub async fn served_certificate(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    let tls = connect_tls(addr, config, "localhost")
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}

/// A gRPC client over TLS (HTTP/2 on a rustls connection).
pub async fn grpc_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Client, tonic::transport::Error> {
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = Arc::clone(&config);
        async move {
            let tls = connect_tls(addr, config, "localhost").await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_with_connector(connector)
        .await?;
    Ok(ModelStoreClient::new(channel))
}

/// A gRPC client in plain text, connecting once (no retries).
pub async fn grpc_plain(addr: SocketAddr) -> Result<Client, tonic::transport::Error> {
    ModelStoreClient::connect(format!("http://{addr}")).await
}

/// An HTTP answer: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

async fn exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: mboxd\r\nConnection: close\r\n");
    if let Some(t) = token {
        request.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    io.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify; what was read is the answer.
    match io.read_to_end(&mut raw).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {text:?}"),
        )
    })?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, head.to_owned()))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Chunked bodies (axum streams none of ours, but be safe): join the chunks.
    let body = if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// `method path` over plain HTTP/1.1, with an optional bearer token.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    exchange(tcp, method, path, token).await
}

/// `method path` over HTTPS.
pub async fn https(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    let tls = connect_tls(addr, config, "localhost").await?;
    exchange(tls, method, path, token).await
}

/// An address of this machine that is not loopback, to test what clients off
/// loopback get; `None` when there is none.
pub fn non_loopback_ip() -> Option<IpAddr> {
    // connect() on a UDP socket sends nothing; it picks the outgoing interface.
    for target in ["192.0.2.1:9", "10.255.255.255:9", "8.8.8.8:53"] {
        let found = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect(target).map(|_| s))
            .and_then(|s| s.local_addr())
            .map(|a| a.ip())
            .ok()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
        if let Some(ip) = found
            && std::net::TcpListener::bind((ip, 0)).is_ok()
        {
            return Some(ip);
        }
    }
    None
}

/// A free port on `ip`.
pub fn free_addr_on(ip: IpAddr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
}
