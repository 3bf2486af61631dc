//! TLS on the gRPC and HTTP listeners, with a CA made at test time: calls succeed
//! over TLS, plain-text clients are refused, mutual TLS refuses gRPC clients
//! without a certificate from the client CA, and a rotated certificate is served
//! to new connections without a restart.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::tls::{
    Ca, client_config, grpc_plain, grpc_tls, http, https, served_certificate, write_server_files,
};
use common::{Client, TestServer, create_experiment, free_addr, temp_config};
use mboxd::proto;

struct Served {
    _dir: tempfile::TempDir,
    server: TestServer,
    web: SocketAddr,
}

/// mboxd with TLS from files in its temp folder (as `files` returns them).
async fn start(files: impl FnOnce(&std::path::Path) -> mboxd::config::Tls) -> Served {
    let (dir, mut config) = temp_config();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    config.tls = Some(files(&tls_dir));
    let web = free_addr();
    config.http_listen = Some(web);
    let server = TestServer::start(config).await;
    Served {
        _dir: dir,
        server,
        web,
    }
}

/// Retries a TLS connection until mboxd serves (start-up runs first).
async fn tls_client(addr: SocketAddr, config: std::sync::Arc<rustls::ClientConfig>) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match grpc_tls(addr, config.clone()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("no TLS connection: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn wait_for_http(web: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(web).await.is_err() {
        assert!(Instant::now() < deadline, "no HTTP listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_experiment(c: &mut Client, id: &str) -> Result<String, tonic::Status> {
    Ok(
        c.get_experiment(proto::GetExperimentRequest { id: id.into() })
            .await?
            .into_inner()
            .experiment
            .map(|e| e.name)
            .unwrap_or_default(),
    )
}

#[tokio::test]
async fn tls_serves_grpc_and_https_and_refuses_plain_text() {
    let ca = Ca::new("mboxd test CA");
    let leaf = ca.server([127, 0, 0, 1].into(), "mboxd", 1);
    let s = start(|dir| write_server_files(dir, &leaf, None)).await;
    let addr = s.server.addr;

    // gRPC over TLS: a write and a read.
    let mut c = tls_client(addr, client_config(&ca, b"h2", None)).await;
    let id = create_experiment(&mut c, "cv", "over-tls").await;
    assert_eq!(get_experiment(&mut c, &id).await.expect("read"), "over-tls");
    assert_eq!(
        served_certificate(addr, client_config(&ca, b"h2", None)).await,
        leaf.der
    );

    // A plain-text gRPC client gets nowhere.
    let refused = match grpc_plain(addr).await {
        Err(_) => true,
        Ok(mut plain) => get_experiment(&mut plain, &id).await.is_err(),
    };
    assert!(refused, "a plain-text gRPC client was served");

    // A client that does not trust the server's CA refuses it.
    let stranger = Ca::new("another CA");
    assert!(
        grpc_tls(addr, client_config(&stranger, b"h2", None))
            .await
            .is_err()
    );

    // HTTPS: pages, metrics and the API (loopback, authentication off).
    wait_for_http(s.web).await;
    let web_tls = client_config(&ca, b"http/1.1", None);
    let a = https(s.web, web_tls.clone(), "GET", "/healthz", None)
        .await
        .expect("https");
    assert_eq!((a.status, a.body.as_str()), (200, "SERVING\n"));
    let a = https(
        s.web,
        web_tls.clone(),
        "GET",
        &format!("/api/v1/experiments/{id}"),
        None,
    )
    .await
    .expect("https");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["name"], "over-tls");
    assert_eq!(served_certificate(s.web, web_tls).await, leaf.der);
    // Plain HTTP to the TLS listener: no HTTP answer.
    match http(s.web, "GET", "/healthz", None).await {
        Err(_) => {}
        Ok(a) => panic!("plain HTTP was answered: {a:?}"),
    }
    s.server.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_grpc_clients_without_a_certificate() {
    let ca = Ca::new("mboxd test CA");
    let leaf = ca.server([127, 0, 0, 1].into(), "mboxd", 1);
    let s = start(|dir| write_server_files(dir, &leaf, Some(&ca))).await;
    let addr = s.server.addr;

    // With a client certificate from the CA: served.
    let trainer = ca.client("trainer");
    let mut c = tls_client(addr, client_config(&ca, b"h2", Some(&trainer))).await;
    let id = create_experiment(&mut c, "cv", "mtls").await;
    assert_eq!(get_experiment(&mut c, &id).await.expect("read"), "mtls");

    // Without one: refused (in TLS 1.3 the client learns it at its first read).
    let refused = |r: Result<String, tonic::Status>| r.is_err();
    match grpc_tls(addr, client_config(&ca, b"h2", None)).await {
        Err(_) => {}
        Ok(mut anonymous) => assert!(
            refused(get_experiment(&mut anonymous, &id).await),
            "a client without a certificate was served"
        ),
    }
    // With one from another CA: refused.
    let stranger = Ca::new("another CA");
    let forged = stranger.client("trainer");
    match grpc_tls(addr, client_config(&ca, b"h2", Some(&forged))).await {
        Err(_) => {}
        Ok(mut c) => assert!(
            refused(get_experiment(&mut c, &id).await),
            "a client with a certificate from another CA was served"
        ),
    }

    // HTTP: a certificate is optional (probes, Prometheus, browsers)...
    wait_for_http(s.web).await;
    let a = https(
        s.web,
        client_config(&ca, b"http/1.1", None),
        "GET",
        "/healthz",
        None,
    )
    .await
    .expect("https without a client certificate");
    assert_eq!(a.status, 200);
    let a = https(
        s.web,
        client_config(&ca, b"http/1.1", Some(&trainer)),
        "GET",
        "/metrics",
        None,
    )
    .await
    .expect("https with a client certificate");
    assert_eq!(a.status, 200);
    // ...but one that does not verify is refused.
    assert!(
        https(
            s.web,
            client_config(&ca, b"http/1.1", Some(&forged)),
            "GET",
            "/healthz",
            None
        )
        .await
        .is_err()
    );
    s.server.stop().await;
}

/// Replaces a file the way kubelet and cert-manager do: a new file renamed over it.
fn replace(path: &std::path::Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let ca = Ca::new("mboxd test CA");
    let a = ca.server([127, 0, 0, 1].into(), "mboxd-a", 1);
    let b = ca.server([127, 0, 0, 1].into(), "mboxd-b", 2);
    assert_ne!(a.der, b.der);
    let mut files = None;
    let s = start(|dir| {
        let f = write_server_files(dir, &a, None);
        files = Some(f.clone());
        f
    })
    .await;
    let files = files.expect("files");
    let addr = s.server.addr;
    let grpc = client_config(&ca, b"h2", None);
    let web = client_config(&ca, b"http/1.1", None);

    let mut before = tls_client(addr, grpc.clone()).await;
    let id = create_experiment(&mut before, "cv", "rotation").await;
    wait_for_http(s.web).await;
    assert_eq!(served_certificate(addr, grpc.clone()).await, a.der);
    assert_eq!(served_certificate(s.web, web.clone()).await, a.der);

    // Rotate: key first, then certificate (a handshake in between sees a
    // mismatched pair and keeps serving A).
    replace(&files.key_file, &b.key_pem);
    replace(&files.cert_file, &b.cert_pem);
    assert_eq!(served_certificate(addr, grpc.clone()).await, b.der);
    assert_eq!(served_certificate(s.web, web.clone()).await, b.der);
    let mut after = tls_client(addr, grpc.clone()).await;
    assert_eq!(
        get_experiment(&mut after, &id).await.expect("read"),
        "rotation"
    );
    // The connection made before the rotation keeps working.
    assert_eq!(
        get_experiment(&mut before, &id).await.expect("read"),
        "rotation"
    );

    // Files that do not load leave B in service.
    std::fs::write(&files.cert_file, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
    assert_eq!(served_certificate(addr, grpc.clone()).await, b.der);
    let mut still = tls_client(addr, grpc.clone()).await;
    assert_eq!(
        get_experiment(&mut still, &id).await.expect("read"),
        "rotation"
    );
    s.server.stop().await;
}

#[tokio::test]
async fn the_binary_takes_tls_and_tokens_from_flags_and_environment() {
    let ca = Ca::new("mboxd test CA");
    let leaf = ca.server([127, 0, 0, 1].into(), "mboxd", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_server_files(dir.path(), &leaf, None);
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[tokens]]\nname = \"ci\"\ntoken = \"from-the-secret\"\nscopes = [\"write\", \"read\"]\nnamespaces = [\"*\"]\n",
    )
    .expect("tokens");
    let p = common::Process::start_with(dir.path().join("data").as_path(), "tls", &[], |cmd| {
        cmd.env("MBOXD_TLS_CERT_FILE", &files.cert_file)
            .env("MBOXD_TLS_KEY_FILE", &files.key_file)
            .env("MBOXD_AUTH_TOKENS_FILE", &tokens);
    })
    .await;
    let addr: SocketAddr = p.addr.parse().expect("addr");
    let mut c = tls_client(addr, client_config(&ca, b"h2", None)).await;
    // Loopback is exempt by default, so send a wrong token to see tokens apply.
    let mut request = tonic::Request::new(proto::ListExperimentsRequest::default());
    request
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().expect("ascii"));
    let s = c.list_experiments(request).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    let mut request = tonic::Request::new(proto::ListExperimentsRequest::default());
    request.metadata_mut().insert(
        "authorization",
        "Bearer from-the-secret".parse().expect("ascii"),
    );
    c.list_experiments(request).await.expect("with the token");
    assert!(p.terminate().await, "mboxd exits 0");
}
