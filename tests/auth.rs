//! Tokens, scopes and namespaces on every gRPC RPC and every HTTP endpoint: no
//! token is UNAUTHENTICATED (401), a token outside its scope or namespace is
//! PERMISSION_DENIED (403) naming the namespace, whether or not the experiment
//! exists is never told to a caller without a token, and the loopback exemption
//! applies on loopback only, and only while it is on.
//!
//! Off loopback is tested by serving on this machine's own non-loopback address
//! (a connection to it does not come from 127.0.0.1).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::tls::{HttpAnswer, free_addr_on, non_loopback_ip};
use common::{Client, TestServer, free_addr, numeric_block, scrape, temp_config};
use mboxd::config::{Auth, Namespaces, Scope, Secret, TokenConfig, TokenValue};
use mboxd::proto;
use tonic::{Code, Request, Status};

const ALL: &str = "tok-all-3b1f";
const READ: &str = "tok-read-77c0";
const WRITE: &str = "tok-write-only-91aa";
const CV: &str = "tok-cv-5d2e";

fn token(name: &str, value: &str, scopes: &[Scope], namespaces: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        value: TokenValue::Inline(Secret(value.into())),
        scopes: scopes.iter().copied().collect(),
        namespaces: match namespaces {
            ["*"] => Namespaces::All,
            _ => Namespaces::Only(namespaces.iter().map(|s| s.to_string()).collect()),
        },
    }
}

fn auth(loopback_exempt: bool) -> Auth {
    Auth {
        enabled: true,
        allow_unauthenticated_loopback: loopback_exempt,
        tokens: vec![
            token("all", ALL, &[Scope::Read, Scope::Write], &["*"]),
            token("reader", READ, &[Scope::Read], &["*"]),
            token("writer", WRITE, &[Scope::Write], &["*"]),
            token("cv", CV, &[Scope::Read, Scope::Write], &["cv"]),
        ],
        tokens_file: None,
    }
}

/// The address tests reach "off loopback", or why not.
fn off_loopback() -> Option<IpAddr> {
    let ip = non_loopback_ip();
    if ip.is_none() {
        eprintln!("SKIPPED: this machine has no non-loopback address to test clients off loopback");
    }
    ip
}

fn req<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    common::tls::http(addr, method, path, token).await
}

/// A server on `ip` with `auth`, its HTTP listener on `ip` too, and a client.
async fn start(ip: IpAddr, auth: Auth) -> (tempfile::TempDir, TestServer, Client, SocketAddr) {
    let (dir, mut config) = temp_config();
    let web = if ip.is_loopback() {
        free_addr()
    } else {
        free_addr_on(ip)
    };
    config.http_listen = Some(web);
    config.auth = auth;
    let mut server = TestServer::start_on(SocketAddr::new(ip, 0), config).await;
    let client = server.client().await;
    // The HTTP listener opens once start-up is done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while http(web, "GET", "/healthz", None).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no HTTP listener");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (dir, server, client, web)
}

/// What the fixtures hold in each namespace.
struct Fixture {
    cv: String,
    nlp: String,
}

impl Fixture {
    fn id(&self, ns: &str) -> &str {
        if ns == "cv" { &self.cv } else { &self.nlp }
    }
}

/// One experiment per namespace ("run-cv", "run-nlp"), with metadata lr = 0.5,
/// loss at steps 0..4 and a "start" event, written with the all-powerful token.
async fn fixtures(c: &mut Client) -> Fixture {
    let mut ids = Vec::new();
    for ns in ["cv", "nlp"] {
        let id = c
            .create_experiment(req(
                proto::CreateExperimentRequest {
                    name: format!("run-{ns}"),
                    owner: "tester".into(),
                    namespace: ns.into(),
                    ..Default::default()
                },
                Some(ALL),
            ))
            .await
            .expect("create")
            .into_inner()
            .experiment_id;
        c.update_metadata(req(
            proto::UpdateMetadataRequest {
                parent_id: id.clone(),
                metadata: Some(proto::Metadata {
                    metadata: [("lr".to_string(), number(0.5))].into(),
                }),
            },
            Some(ALL),
        ))
        .await
        .expect("metadata");
        c.log_metrics(req(
            proto::LogMetricsRequest {
                blocks: vec![numeric_block(&id, &["loss"], 4, 0)],
                ..Default::default()
            },
            Some(ALL),
        ))
        .await
        .expect("metrics");
        c.log_event(req(start_event(&id), Some(ALL)))
            .await
            .expect("event");
        ids.push(id);
    }
    Fixture {
        cv: ids[0].clone(),
        nlp: ids[1].clone(),
    }
}

fn number(v: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(v)),
    }
}

fn start_event(id: &str) -> proto::LogEventRequest {
    proto::LogEventRequest {
        parent_id: id.into(),
        event: Some(proto::Event {
            name: "start".into(),
            source: Some(proto::EventSource {
                name: "trainer".into(),
            }),
            wallclock_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            metadata: None,
        }),
        ..Default::default()
    }
}

/// Every ModelStore RPC.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    CreateExperiment,
    GetExperiment,
    ListExperiments,
    UpdateMetadata,
    ListMetadata,
    LogMetricsPoint,
    LogMetricsBlocks,
    GetMetrics,
    LogEvent,
    ListEvents,
    CreateModel,
    ListModels,
    CreateModelVersion,
    ListModelVersions,
    CreateCheckpoint,
    ListCheckpoints,
    GetCheckpoint,
    UploadFile,
    DownloadFile,
    TrackArtifacts,
    ListTrackedArtifacts,
    WatchNamespace,
    GetClusterMembers,
}

const RPCS: [Rpc; 23] = [
    Rpc::CreateExperiment,
    Rpc::GetExperiment,
    Rpc::ListExperiments,
    Rpc::UpdateMetadata,
    Rpc::ListMetadata,
    Rpc::LogMetricsPoint,
    Rpc::LogMetricsBlocks,
    Rpc::GetMetrics,
    Rpc::LogEvent,
    Rpc::ListEvents,
    Rpc::CreateModel,
    Rpc::ListModels,
    Rpc::CreateModelVersion,
    Rpc::ListModelVersions,
    Rpc::CreateCheckpoint,
    Rpc::ListCheckpoints,
    Rpc::GetCheckpoint,
    Rpc::UploadFile,
    Rpc::DownloadFile,
    Rpc::TrackArtifacts,
    Rpc::ListTrackedArtifacts,
    Rpc::WatchNamespace,
    Rpc::GetClusterMembers,
];

impl Rpc {
    /// The scope it needs; `None`: out of scope for mboxd (UNIMPLEMENTED).
    fn scope(self) -> Option<Scope> {
        use Rpc::*;
        match self {
            CreateExperiment | UpdateMetadata | LogMetricsPoint | LogMetricsBlocks | LogEvent => {
                Some(Scope::Write)
            }
            GetExperiment | ListExperiments | ListMetadata | GetMetrics | ListEvents => {
                Some(Scope::Read)
            }
            _ => None,
        }
    }
}

/// Calls `rpc` on namespace `ns`'s fixture (or on `ns` itself) with `token`, and,
/// when it succeeds, checks what it answered.
async fn call(
    c: &mut Client,
    rpc: Rpc,
    token: Option<&str>,
    fx: &Fixture,
    ns: &str,
) -> Result<(), Status> {
    let id = fx.id(ns).to_owned();
    match rpc {
        Rpc::CreateExperiment => {
            let r = c
                .create_experiment(req(
                    proto::CreateExperimentRequest {
                        name: format!("run-{ns}"),
                        owner: "tester".into(),
                        namespace: ns.into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner();
            assert_eq!(r.experiment_id, id, "the same experiment, created again");
            assert!(r.experiment_exists);
        }
        Rpc::GetExperiment => {
            let e = c
                .get_experiment(req(proto::GetExperimentRequest { id: id.clone() }, token))
                .await?
                .into_inner()
                .experiment
                .expect("experiment");
            assert_eq!(
                (e.id, e.name, e.namespace),
                (id, format!("run-{ns}"), ns.into())
            );
        }
        Rpc::ListExperiments => {
            let names: Vec<String> = c
                .list_experiments(req(
                    proto::ListExperimentsRequest {
                        namespace: ns.into(),
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner()
                .experiments
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert_eq!(names, vec![format!("run-{ns}")]);
        }
        Rpc::UpdateMetadata => {
            let r = c
                .update_metadata(req(
                    proto::UpdateMetadataRequest {
                        parent_id: id,
                        metadata: Some(proto::Metadata {
                            metadata: [("lr".to_string(), number(0.5))].into(),
                        }),
                    },
                    token,
                ))
                .await?
                .into_inner();
            assert_eq!(r.num_keys_written, 1);
        }
        Rpc::ListMetadata => {
            let md = c
                .list_metadata(req(proto::ListMetadataRequest { parent_id: id }, token))
                .await?
                .into_inner()
                .metadata;
            assert_eq!(md, [("lr".to_string(), number(0.5))].into());
        }
        Rpc::LogMetricsPoint => {
            let r = c
                .log_metrics(req(
                    proto::LogMetricsRequest {
                        parent_id: id,
                        key: "w".into(),
                        value: Some(proto::MetricsValue {
                            step: 1,
                            wallclock_time: 1,
                            value: Some(proto::metrics_value::Value::FVal(1.0)),
                        }),
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner();
            assert_eq!(r.points_accepted, 1);
        }
        Rpc::LogMetricsBlocks => {
            let r = c
                .log_metrics(req(
                    proto::LogMetricsRequest {
                        blocks: vec![numeric_block(&id, &["w"], 2, 100)],
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner();
            assert_eq!(r.points_accepted, 2);
        }
        Rpc::GetMetrics => {
            let m = c
                .get_metrics(req(
                    proto::GetMetricsRequest {
                        parent_id: id,
                        keys: vec!["loss".into()],
                        full_precision: true,
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner()
                .metrics;
            assert_eq!(m.len(), 1);
            let steps: Vec<u64> = m[0].values.iter().map(|v| v.step).collect();
            assert_eq!((m[0].key.as_str(), steps), ("loss", vec![0, 1, 2, 3]));
        }
        Rpc::LogEvent => {
            let mut e = start_event(&id);
            if let Some(ev) = e.event.as_mut() {
                ev.name = "w".into();
            }
            let r = c.log_event(req(e, token)).await?.into_inner();
            assert_eq!(r.events_accepted, 1);
        }
        Rpc::ListEvents => {
            let events = c
                .list_events(req(
                    proto::ListEventsRequest {
                        parent_id: id,
                        ..Default::default()
                    },
                    token,
                ))
                .await?
                .into_inner()
                .events;
            let starts: Vec<_> = events.iter().filter(|e| e.name == "start").collect();
            assert_eq!(starts.len(), 1, "{events:?}");
            assert_eq!(
                starts[0].source.as_ref().map(|s| s.name.as_str()),
                Some("trainer")
            );
        }
        Rpc::CreateModel => {
            c.create_model(req(proto::CreateModelRequest::default(), token))
                .await?;
        }
        Rpc::ListModels => {
            c.list_models(req(proto::ListModelsRequest::default(), token))
                .await?;
        }
        Rpc::CreateModelVersion => {
            c.create_model_version(req(proto::CreateModelVersionRequest::default(), token))
                .await?;
        }
        Rpc::ListModelVersions => {
            c.list_model_versions(req(proto::ListModelVersionsRequest::default(), token))
                .await?;
        }
        Rpc::CreateCheckpoint => {
            c.create_checkpoint(req(proto::CreateCheckpointRequest::default(), token))
                .await?;
        }
        Rpc::ListCheckpoints => {
            c.list_checkpoints(req(proto::ListCheckpointsRequest::default(), token))
                .await?;
        }
        Rpc::GetCheckpoint => {
            c.get_checkpoint(req(proto::GetCheckpointRequest::default(), token))
                .await?;
        }
        Rpc::UploadFile => {
            c.upload_file(req(
                tokio_stream::iter(Vec::<proto::UploadFileRequest>::new()),
                token,
            ))
            .await?;
        }
        Rpc::DownloadFile => {
            c.download_file(req(proto::DownloadFileRequest::default(), token))
                .await?;
        }
        Rpc::TrackArtifacts => {
            c.track_artifacts(req(proto::TrackArtifactsRequest::default(), token))
                .await?;
        }
        Rpc::ListTrackedArtifacts => {
            c.list_tracked_artifacts(req(proto::ListTrackedArtifactsRequest::default(), token))
                .await?;
        }
        Rpc::WatchNamespace => {
            c.watch_namespace(req(proto::WatchNamespaceRequest::default(), token))
                .await?;
        }
        Rpc::GetClusterMembers => {
            c.get_cluster_members(req(proto::GetClusterMembersRequest::default(), token))
                .await?;
        }
    }
    Ok(())
}

/// Every series of an experiment (read with the all-powerful token).
async fn series(c: &mut Client, id: &str) -> Vec<proto::Metrics> {
    let page = c
        .get_metrics(req(
            proto::GetMetricsRequest {
                parent_id: id.into(),
                full_precision: true,
                ..Default::default()
            },
            Some(ALL),
        ))
        .await
        .expect("GetMetrics")
        .into_inner();
    assert_eq!(page.next_page_token, "");
    page.metrics
}

#[track_caller]
fn expect_code(result: Result<(), Status>, code: Code, message: &str, what: &str) {
    match result {
        Ok(()) => panic!("{what}: succeeded, expected {code:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(
                s.message().contains(message),
                "{what}: {:?} does not say {message:?}",
                s.message()
            );
        }
    }
}

/// Refused requests, by reason, as /metrics counts them.
async fn refused(http: SocketAddr) -> (f64, f64) {
    let m = scrape(http).await;
    let get = |reason: &str| {
        m.get(&format!(
            "mboxd_requests_refused_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    (get("unauthenticated"), get("permission_denied"))
}

#[tokio::test]
async fn every_rpc_checks_token_scope_and_namespace_off_loopback() {
    let Some(ip) = off_loopback() else { return };
    // The exemption is on: it must not reach clients off loopback.
    let (_dir, server, mut c, http_addr) = start(ip, auth(true)).await;
    let fx = fixtures(&mut c).await;
    let (mut unauthenticated, mut denied) = (0.0, 0.0);

    for rpc in RPCS {
        let what = format!("{rpc:?}");
        expect_code(
            call(&mut c, rpc, None, &fx, "cv").await,
            Code::Unauthenticated,
            "a bearer token is required",
            &format!("{what} without a token"),
        );
        expect_code(
            call(&mut c, rpc, Some("not-a-token"), &fx, "cv").await,
            Code::Unauthenticated,
            "not valid",
            &format!("{what} with an unknown token"),
        );
        unauthenticated += 2.0;
        let Some(scope) = rpc.scope() else {
            // Out of scope for mboxd: UNIMPLEMENTED, once authenticated.
            expect_code(
                call(&mut c, rpc, Some(ALL), &fx, "cv").await,
                Code::Unimplemented,
                "not served by mboxd",
                &what,
            );
            continue;
        };
        // A token without the scope.
        let (other, other_scope) = match scope {
            Scope::Write => (READ, "write"),
            Scope::Read => (WRITE, "read"),
        };
        // Refused for the scope, before the namespace is looked at.
        let s = call(&mut c, rpc, Some(other), &fx, "cv").await.unwrap_err();
        assert_eq!(
            (s.code(), s.message()),
            (
                Code::PermissionDenied,
                &*format!("token may not {other_scope}")
            ),
            "{what} with a token without {other_scope}"
        );
        // A token for cv, on nlp.
        expect_code(
            call(&mut c, rpc, Some(CV), &fx, "nlp").await,
            Code::PermissionDenied,
            &format!("token may not {scope} namespace nlp"),
            &format!("{what} by the cv token on nlp"),
        );
        denied += 2.0;
        // Within scope and namespace: served, with the right data.
        call(&mut c, rpc, Some(CV), &fx, "cv")
            .await
            .unwrap_or_else(|s| panic!("{what} by the cv token on cv: {s:?}"));
        call(&mut c, rpc, Some(ALL), &fx, "nlp")
            .await
            .unwrap_or_else(|s| panic!("{what} by the all token on nlp: {s:?}"));
        if scope == Scope::Read {
            call(&mut c, rpc, Some(READ), &fx, "nlp")
                .await
                .unwrap_or_else(|s| panic!("{what} by the read token: {s:?}"));
        }
    }

    // Whether an id exists is not told without a token; with one, it is.
    let unknown = || proto::GetExperimentRequest {
        id: "0123456789abcdef0123456789abcdef".into(),
    };
    let s = c.get_experiment(req(unknown(), None)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = c
        .get_experiment(req(unknown(), Some(CV)))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    unauthenticated += 1.0;

    // A token without the scope is refused before the request is validated or
    // its experiment looked up: the status is about the token, not the id.
    let s = c
        .log_metrics(req(
            proto::LogMetricsRequest {
                blocks: vec![numeric_block("no-such-experiment", &["loss"], 3, 0)],
                ..Default::default()
            },
            Some(READ),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::PermissionDenied, "token may not write")
    );
    let s = c
        .get_experiment(req(unknown(), Some(WRITE)))
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::PermissionDenied, "token may not read")
    );
    denied += 2.0;

    // A batch with a block the token may not write is refused whole: the cv
    // block is not written either.
    let before = series(&mut c, &fx.cv).await;
    let mixed = proto::LogMetricsRequest {
        blocks: vec![
            numeric_block(&fx.cv, &["mixed"], 3, 0),
            numeric_block(&fx.nlp, &["mixed"], 3, 0),
        ],
        ..Default::default()
    };
    let s = c.log_metrics(req(mixed, Some(CV))).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert_eq!(s.message(), "token may not write namespace nlp");
    denied += 1.0;
    let after = series(&mut c, &fx.cv).await;
    assert_eq!(before, after, "nothing of a refused batch is written");
    assert!(!after.iter().any(|m| m.key == "mixed"));

    // Prometheus counts the refusals by reason, and the refused points.
    assert_eq!(refused(http_addr).await, (unauthenticated, denied));
    let m = scrape(http_addr).await;
    assert_eq!(
        m.get("mboxd_points_rejected_total{reason=\"permission_denied\"}")
            .copied(),
        // 1 single point + 2 block points for each refused LogMetrics (read
        // token, cv token on nlp), the mixed batch's 6, and the 3 of the read
        // token's batch for an unknown experiment.
        Some(2.0 * (1.0 + 2.0) + 6.0 + 3.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn loopback_exemption_on_and_off() {
    let lo: IpAddr = [127, 0, 0, 1].into();
    // On: loopback clients without a token may do everything.
    let (_dir, server, mut c, _) = start(lo, auth(true)).await;
    let fx = fixtures(&mut c).await;
    for rpc in RPCS {
        let result = call(&mut c, rpc, None, &fx, "nlp").await;
        match rpc.scope() {
            Some(_) => result.unwrap_or_else(|s| panic!("{rpc:?} on loopback: {s:?}")),
            None => expect_code(result, Code::Unimplemented, "not served", "unimplemented"),
        }
    }
    // A loopback client that sends a token is held to it.
    expect_code(
        call(&mut c, Rpc::LogMetricsBlocks, Some(READ), &fx, "cv").await,
        Code::PermissionDenied,
        "token may not write",
        "read token on loopback",
    );
    expect_code(
        call(&mut c, Rpc::GetExperiment, Some("wrong"), &fx, "cv").await,
        Code::Unauthenticated,
        "not valid",
        "wrong token on loopback",
    );
    server.stop().await;

    // Off: loopback needs a token like everyone else.
    let (_dir, server, mut c, _) = start(lo, auth(false)).await;
    let fx = fixtures(&mut c).await;
    for rpc in RPCS {
        expect_code(
            call(&mut c, rpc, None, &fx, "cv").await,
            Code::Unauthenticated,
            "a bearer token is required",
            &format!("{rpc:?} on loopback without the exemption"),
        );
    }
    call(&mut c, Rpc::GetExperiment, Some(CV), &fx, "cv")
        .await
        .expect("with a token");
    server.stop().await;
}

#[tokio::test]
async fn authentication_off_lets_every_grpc_client_in() {
    let Some(ip) = off_loopback() else { return };
    let (_dir, server, mut c, http_addr) = start(ip, Auth::default()).await;
    let fx = fixtures(&mut c).await;
    for rpc in RPCS.into_iter().filter(|r| r.scope().is_some()) {
        call(&mut c, rpc, None, &fx, "nlp")
            .await
            .unwrap_or_else(|s| panic!("{rpc:?} with authentication off: {s:?}"));
    }
    // The HTTP API stays loopback-only, as before tokens existed.
    let a = http(http_addr, "GET", "/api/v1/namespaces", None)
        .await
        .expect("http");
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(
        a.json()["error"],
        "the API serves loopback clients only unless [auth] is enabled"
    );
    server.stop().await;
}

// --- HTTP ----------------------------------------------------------------------

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpAnswer {
    http(addr, "GET", path, token)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[track_caller]
fn expect_status(a: &HttpAnswer, status: u16, error: &str, what: &str) {
    assert_eq!(a.status, status, "{what}: {a:?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/json; charset=utf-8"),
        "{what}"
    );
    let said = a.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        said.contains(error),
        "{what}: {said:?} does not say {error:?}"
    );
    if status == 401 {
        assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{what}");
    }
}

fn names(a: &HttpAnswer) -> BTreeSet<String> {
    a.json()["experiments"]
        .as_array()
        .expect("experiments")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn every_http_endpoint_checks_token_scope_and_namespace_off_loopback() {
    let Some(ip) = off_loopback() else { return };
    let (_dir, server, mut c, web) = start(ip, auth(true)).await;
    let fx = fixtures(&mut c).await;
    let (cv, nlp) = (fx.cv.clone(), fx.nlp.clone());
    let (mut unauthenticated, mut denied) = (0.0, 0.0);

    // Every API endpoint, reading namespace nlp's data where it has any.
    let api = [
        "/api/v1/namespaces".to_owned(),
        "/api/v1/experiments".to_owned(),
        "/api/v1/experiments?namespace=nlp".to_owned(),
        format!("/api/v1/experiments/{nlp}"),
        format!("/api/v1/experiments/{nlp}/events"),
        format!("/api/v1/experiments/{nlp}/series?keys=loss"),
        "/api/v1/health".to_owned(),
        "/api/v1/no-such-endpoint".to_owned(),
    ];
    for path in &api {
        expect_status(
            &get(web, path, None).await,
            401,
            "a bearer token is required",
            &format!("{path} without a token"),
        );
        expect_status(
            &get(web, path, Some("nope")).await,
            401,
            "not valid",
            &format!("{path} with an unknown token"),
        );
        unauthenticated += 2.0;
        if path.contains("no-such") {
            continue;
        }
        // A token that may write but not read.
        let a = get(web, path, Some(WRITE)).await;
        // Refused for the scope, before an id or namespace is looked at; only
        // a list of one namespace names it.
        let says = if path.contains("namespace=") {
            "token may not read namespace nlp"
        } else {
            "token may not read"
        };
        expect_status(&a, 403, says, &format!("{path} with a write-only token"));
        denied += 1.0;
        // The read token reads everything.
        assert_eq!(get(web, path, Some(READ)).await.status, 200, "{path}");
    }
    // A token that may not read is refused an unknown id the same way.
    expect_status(
        &get(web, "/api/v1/experiments/no-such-experiment", Some(WRITE)).await,
        403,
        "token may not read",
        "an unknown id with a write-only token",
    );
    denied += 1.0;
    // The write-only token is also refused a path that is not there, and a
    // method the API does not have, after authentication: 404 and 405.
    expect_status(
        &get(web, "/api/v1/no-such-endpoint", Some(READ)).await,
        404,
        "no API endpoint",
        "unknown path",
    );
    let a = http(web, "POST", "/api/v1/experiments", Some(READ))
        .await
        .expect("post");
    assert_eq!(a.status, 405, "{a:?}");
    let a = http(web, "POST", "/api/v1/experiments", None)
        .await
        .expect("post");
    assert_eq!(a.status, 401, "{a:?}");
    unauthenticated += 1.0;

    // The cv token: nlp's experiments are refused, naming the namespace...
    for path in [
        format!("/api/v1/experiments/{nlp}"),
        format!("/api/v1/experiments/{nlp}/events"),
        format!("/api/v1/experiments/{nlp}/series"),
        "/api/v1/experiments?namespace=nlp".to_owned(),
    ] {
        expect_status(
            &get(web, &path, Some(CV)).await,
            403,
            "token may not read namespace nlp",
            &format!("{path} with the cv token"),
        );
        denied += 1.0;
    }
    // ...cv's are served...
    let a = get(web, &format!("/api/v1/experiments/{cv}"), Some(CV)).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        (a.json()["name"].as_str(), a.json()["keys"].clone()),
        (Some("run-cv"), serde_json::json!(["loss"]))
    );
    let a = get(
        web,
        &format!("/api/v1/experiments/{cv}/series?keys=loss"),
        Some(CV),
    )
    .await;
    assert_eq!(
        a.json()["series"][0]["steps"],
        serde_json::json!([0, 1, 2, 3])
    );
    let a = get(web, &format!("/api/v1/experiments/{cv}/events"), Some(CV)).await;
    assert_eq!(a.json()["events"][0]["name"], "start");
    // ...and lists across namespaces show only cv.
    let a = get(web, "/api/v1/namespaces", Some(CV)).await;
    assert_eq!(a.json(), serde_json::json!({"namespaces": ["cv"]}));
    let a = get(web, "/api/v1/experiments", Some(CV)).await;
    assert_eq!(names(&a), ["run-cv".to_owned()].into());
    assert_eq!(a.json()["next_page_token"], "");
    let a = get(web, "/api/v1/experiments?page_size=1", Some(CV)).await;
    assert_eq!(names(&a), ["run-cv".to_owned()].into());
    assert_eq!(a.json()["next_page_token"], "", "no page of others follows");
    let a = get(web, "/api/v1/experiments", Some(ALL)).await;
    assert_eq!(
        names(&a),
        ["run-cv".to_owned(), "run-nlp".to_owned()].into()
    );
    let a = get(web, "/api/v1/namespaces", Some(READ)).await;
    assert_eq!(a.json(), serde_json::json!({"namespaces": ["cv", "nlp"]}));
    // An unknown experiment: 401 without a token, 404 with one.
    let unknown = "/api/v1/experiments/0123456789abcdef0123456789abcdef";
    assert_eq!(get(web, unknown, None).await.status, 401);
    assert_eq!(get(web, unknown, Some(CV)).await.status, 404);
    unauthenticated += 1.0;

    // Pages, assets, /metrics and /healthz are open.
    for path in [
        "/",
        "/health",
        "/compare",
        "/assets/app.js",
        "/metrics",
        "/healthz",
    ] {
        assert_eq!(get(web, path, None).await.status, 200, "{path}");
    }
    assert_eq!(get(web, "/healthz", None).await.body, "SERVING\n");
    assert_eq!(refused(web).await, (unauthenticated, denied));
    server.stop().await;
}

#[tokio::test]
async fn http_loopback_exemption_on_and_off() {
    let lo: IpAddr = [127, 0, 0, 1].into();
    let (_dir, server, mut c, web) = start(lo, auth(true)).await;
    let fx = fixtures(&mut c).await;
    let a = get(web, &format!("/api/v1/experiments/{}", fx.nlp), None).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(get(web, "/api/v1/health", None).await.status, 200);
    // A token sent from loopback is held to.
    let a = get(web, &format!("/api/v1/experiments/{}", fx.nlp), Some(CV)).await;
    expect_status(
        &a,
        403,
        "token may not read namespace nlp",
        "cv on loopback",
    );
    server.stop().await;

    let (_dir, server, _c, web) = start(lo, auth(false)).await;
    for path in [
        "/api/v1/namespaces",
        "/api/v1/experiments",
        "/api/v1/health",
    ] {
        expect_status(
            &get(web, path, None).await,
            401,
            "a bearer token is required",
            path,
        );
        assert_eq!(get(web, path, Some(READ)).await.status, 200, "{path}");
    }
    server.stop().await;
}
