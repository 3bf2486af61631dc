//! Run search: every filter operator and sort against a brute-force evaluation of
//! the same data, pages that return every match once, metric summaries exact after
//! out-of-order steps, restarts and a SIGKILL, and a ModelBox-style client listing
//! a 100,000-experiment namespace.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use mboxd::proto;
use prost_types::value::Kind;

/// What the test knows of an experiment, to evaluate filters itself.
#[derive(Debug, Clone)]
struct Known {
    id: String,
    /// Creation order (creation time, strictly increasing here), which breaks
    /// ties in a sort.
    seq: usize,
    name: String,
    owner: String,
    namespace: String,
    framework: &'static str,
    created_ms: f64,
    params: BTreeMap<String, Val>,
    /// key → (last, last_step, min, max, count)
    metrics: BTreeMap<String, (f64, i64, f64, f64, u64)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Num(f64),
    Text(String),
    Bool(bool),
}

fn cmp_val(a: &Val, b: &Val) -> Option<Ordering> {
    match (a, b) {
        (Val::Num(x), Val::Num(y)) => x.partial_cmp(y),
        (Val::Text(x), Val::Text(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Known {
    fn field(&self, f: &str) -> Option<Val> {
        Some(match f {
            "id" => Val::Text(self.id.clone()),
            "name" => Val::Text(self.name.clone()),
            "owner" => Val::Text(self.owner.clone()),
            "namespace" => Val::Text(self.namespace.clone()),
            "framework" => Val::Text(self.framework.into()),
            "created_at" => Val::Num(self.created_ms),
            _ => {
                if let Some(k) = f.strip_prefix("params.") {
                    return self.params.get(k).cloned();
                }
                let m = f.strip_prefix("metrics.")?;
                let (key, agg) = m.rsplit_once('.')?;
                let (last, last_step, min, max, count) = *self.metrics.get(key)?;
                match agg {
                    "last" => Val::Num(last),
                    "last_step" => Val::Num(last_step as f64),
                    "min" => Val::Num(min),
                    "max" => Val::Num(max),
                    "count" => Val::Num(count as f64),
                    _ => return None,
                }
            }
        })
    }

    fn holds(&self, field: &str, op: &str, want: &Val) -> bool {
        let Some(have) = self.field(field) else {
            return op == "!=";
        };
        match op {
            "~" => {
                matches!((&have, want), (Val::Text(h), Val::Text(w)) if h.to_lowercase().contains(&w.to_lowercase()))
            }
            "^=" => {
                matches!((&have, want), (Val::Text(h), Val::Text(w)) if h.starts_with(w.as_str()))
            }
            _ => match cmp_val(&have, want) {
                None => op == "!=",
                Some(o) => match op {
                    "=" => o.is_eq(),
                    "!=" => o.is_ne(),
                    "<" => o.is_lt(),
                    "<=" => o.is_le(),
                    ">" => o.is_gt(),
                    ">=" => o.is_ge(),
                    _ => unreachable!("{op}"),
                },
            },
        }
    }
}

fn text(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn num(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// A condition as the brute force evaluates it: (field, operator, value).
type Cond = (&'static str, &'static str, Val);

/// Every page of a search, with the page size asked.
async fn search(
    c: &mut Client,
    ns: &str,
    filter: &str,
    order_by: &[&str],
    page: u32,
) -> Vec<String> {
    let mut token = String::new();
    let mut out = Vec::new();
    loop {
        let r = c
            .list_experiments(proto::ListExperimentsRequest {
                namespace: ns.into(),
                filter: filter.into(),
                order_by: order_by.iter().map(|s| s.to_string()).collect(),
                page_size: page,
                page_token: token,
                include_details: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.experiments.len() <= page as usize);
        out.extend(r.experiments.into_iter().map(|e| e.id));
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_filter_and_sort_matches_a_brute_force_evaluation() {
    let (_dir, mut config) = temp_config();
    config.roll.max_age = Duration::from_millis(50);
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let mut rng = 0x1234_5678_9ABC_DEF1_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut known: Vec<Known> = Vec::new();
    for i in 0..48 {
        let namespace = if i % 4 == 0 { "other" } else { "runs" };
        let mut params = BTreeMap::new();
        let mut md = BTreeMap::new();
        let lr = [0.0001, 0.0003, 0.001, 0.003][(next() % 4) as usize];
        params.insert("lr".to_owned(), Val::Num(lr));
        md.insert("lr".to_owned(), num(lr));
        if i % 3 != 0 {
            let opt = ["adam", "adamw", "sgd"][(next() % 3) as usize];
            params.insert("opt".to_owned(), Val::Text(opt.into()));
            md.insert("opt".to_owned(), text(opt));
        }
        if i % 5 == 0 {
            params.insert("flag".to_owned(), Val::Bool(i % 2 == 0));
            md.insert(
                "flag".to_owned(),
                prost_types::Value {
                    kind: Some(Kind::BoolValue(i % 2 == 0)),
                },
            );
        }
        let name = format!("{}-{i:02}", ["ResNet", "vit", "gpt"][i % 3]);
        let owner = ["ana", "bo", "cy"][(next() % 3) as usize].to_owned();
        let framework = if i % 2 == 0 { 1 } else { 2 };
        let created = c
            .create_experiment(proto::CreateExperimentRequest {
                name: name.clone(),
                owner: owner.clone(),
                namespace: namespace.into(),
                framework,
                metadata: Some(proto::Metadata {
                    metadata: md.into_iter().collect(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut k = Known {
            id: created.experiment_id.clone(),
            seq: i,
            name,
            owner,
            namespace: namespace.into(),
            framework: if framework == 1 { "PYTORCH" } else { "KERAS" },
            created_ms: created.created_at.map_or(0.0, |t| {
                (t.seconds * 1000 + i64::from(t.nanos) / 1_000_000) as f64
            }),
            params,
            metrics: BTreeMap::new(),
        };
        if i % 6 != 5 {
            // val/loss over out-of-order steps in two requests.
            let n = 5 + (next() % 20) as usize;
            let steps: Vec<u64> = (0..n).map(|_| next() % 100).collect();
            let values: Vec<f64> = (0..n).map(|_| (next() % 1000) as f64 / 1000.0).collect();
            let (mut last, mut last_step) = (0.0, -1i64);
            for (&s, &v) in steps.iter().zip(&values) {
                // Equal steps: the later one sent is the last.
                if s as i64 >= last_step {
                    last = v;
                    last_step = s as i64;
                }
            }
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            k.metrics
                .insert("val/loss".into(), (last, last_step, min, max, n as u64));
            let half = n / 2;
            for (lo, hi) in [(0, half), (half, n)] {
                if lo == hi {
                    continue;
                }
                c.log_metrics(proto::LogMetricsRequest {
                    blocks: vec![proto::MetricsBlock {
                        parent_id: k.id.clone(),
                        keys: vec!["val/loss".into()],
                        key_index: vec![0; hi - lo],
                        steps: steps[lo..hi].to_vec(),
                        wallclock_times: vec![1; hi - lo],
                        values: values[lo..hi].to_vec(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        known.push(k);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // Summaries appear as files are published.
    let with_metrics = known.iter().filter(|k| !k.metrics.is_empty()).count();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut n = 0;
        for ns in ["runs", "other"] {
            let r = c
                .list_experiments(proto::ListExperimentsRequest {
                    namespace: ns.into(),
                    include_details: true,
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            n += r
                .experiments
                .iter()
                .filter(|e| e.metric_summaries.iter().any(|s| s.count > 0))
                .count();
        }
        if n == with_metrics {
            break;
        }
        assert!(Instant::now() < deadline, "summaries never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let v_num = Val::Num;
    let v_text = |s: &str| Val::Text(s.into());
    let filters: Vec<(String, Vec<Cond>)> = vec![
        (String::new(), vec![]),
        (
            "name ~ \"resnet\"".into(),
            vec![("name", "~", v_text("resnet"))],
        ),
        (
            "name ^= \"vit\"".into(),
            vec![("name", "^=", v_text("vit"))],
        ),
        (
            "owner = \"ana\"".into(),
            vec![("owner", "=", v_text("ana"))],
        ),
        (
            "owner != \"ana\"".into(),
            vec![("owner", "!=", v_text("ana"))],
        ),
        (
            "framework = \"KERAS\"".into(),
            vec![("framework", "=", v_text("KERAS"))],
        ),
        (
            "params.lr = 0.0003".into(),
            vec![("params.lr", "=", v_num(0.0003))],
        ),
        (
            "params.lr != 0.0003".into(),
            vec![("params.lr", "!=", v_num(0.0003))],
        ),
        (
            "params.lr < 0.001".into(),
            vec![("params.lr", "<", v_num(0.001))],
        ),
        (
            "params.lr <= 0.001".into(),
            vec![("params.lr", "<=", v_num(0.001))],
        ),
        (
            "params.lr > 0.0003".into(),
            vec![("params.lr", ">", v_num(0.0003))],
        ),
        (
            "params.lr >= 0.0003".into(),
            vec![("params.lr", ">=", v_num(0.0003))],
        ),
        (
            "params.opt = 'adamw'".into(),
            vec![("params.opt", "=", v_text("adamw"))],
        ),
        (
            "params.opt ~ \"ADAM\"".into(),
            vec![("params.opt", "~", v_text("ADAM"))],
        ),
        (
            "params.flag = true".into(),
            vec![("params.flag", "=", Val::Bool(true))],
        ),
        (
            "metrics.val/loss.last < 0.5".into(),
            vec![("metrics.val/loss.last", "<", v_num(0.5))],
        ),
        (
            "metrics.val/loss.min >= 0.1".into(),
            vec![("metrics.val/loss.min", ">=", v_num(0.1))],
        ),
        (
            "metrics.val/loss.max > 0.9".into(),
            vec![("metrics.val/loss.max", ">", v_num(0.9))],
        ),
        (
            "metrics.val/loss.count >= 15".into(),
            vec![("metrics.val/loss.count", ">=", v_num(15.0))],
        ),
        (
            "metrics.val/loss.last_step <= 90".into(),
            vec![("metrics.val/loss.last_step", "<=", v_num(90.0))],
        ),
        (
            "params.lr = 0.0003 and metrics.val/loss.last < 0.6 and owner != 'bo'".into(),
            vec![
                ("params.lr", "=", v_num(0.0003)),
                ("metrics.val/loss.last", "<", v_num(0.6)),
                ("owner", "!=", v_text("bo")),
            ],
        ),
    ];
    let sorts: Vec<Vec<&str>> = vec![
        vec![],
        vec!["created_at ASC"],
        vec!["name DESC"],
        vec!["owner", "created_at DESC"],
        vec!["params.lr DESC"],
        vec!["params.opt"],
        vec!["metrics.val/loss.last ASC"],
        vec!["metrics.val/loss.max DESC"],
        vec!["metrics.val/loss.count DESC", "name"],
    ];
    let value_order = |a: &Option<Val>, b: &Option<Val>, desc: bool| -> Ordering {
        match (a, b) {
            (None, None) => Ordering::Equal,
            (None, _) => Ordering::Greater,
            (_, None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let o = cmp_val(x, y).unwrap_or(Ordering::Equal);
                if desc { o.reverse() } else { o }
            }
        }
    };
    let mut checked = 0;
    for ns in ["runs", "other"] {
        for (filter, conds) in &filters {
            for sort in &sorts {
                let mut want: Vec<&Known> = known
                    .iter()
                    .filter(|k| k.namespace == ns)
                    .filter(|k| conds.iter().all(|(f, op, v)| k.holds(f, op, v)))
                    .collect();
                let keys: Vec<(String, bool)> = if sort.is_empty() {
                    vec![("created_at".into(), true)]
                } else {
                    sort.iter()
                        .map(|s| {
                            let mut p = s.split_whitespace();
                            let f = p.next().unwrap().to_owned();
                            (f, p.next() == Some("DESC"))
                        })
                        .collect()
                };
                want.sort_by(|a, b| {
                    for (f, desc) in &keys {
                        let o = value_order(&a.field(f), &b.field(f), *desc);
                        if o.is_ne() {
                            return o;
                        }
                    }
                    a.seq.cmp(&b.seq)
                });
                let want: Vec<String> = want.into_iter().map(|k| k.id.clone()).collect();
                for page in [5, 1000] {
                    let got = search(&mut c, ns, filter, sort, page).await;
                    assert_eq!(
                        got, want,
                        "namespace {ns}, filter {filter:?}, sort {sort:?}, page {page}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 300);
    server.stop().await;
}

#[tokio::test]
async fn summaries_are_exact_after_out_of_order_steps_restarts_and_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--roll-max-age-ms", "100"];
    let proc = Process::start(&data, &args).await;
    let mut c = proc.client().await;
    let id = create_experiment(&mut c, "sum", "exact").await;
    // Rounds of out-of-order steps; a SIGKILL in the middle of a stream of them.
    let mut rng = 99u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut send = |c: Client, n: usize| {
        let mut c = c;
        let id = id.clone();
        let steps: Vec<u64> = (0..n).map(|_| next() % 10_000).collect();
        let values: Vec<f64> = (0..n).map(|_| (next() % 100_000) as f64 / 7.0).collect();
        async move {
            let ok = c
                .log_metrics(proto::LogMetricsRequest {
                    blocks: vec![proto::MetricsBlock {
                        parent_id: id,
                        keys: vec!["loss".into()],
                        key_index: vec![0; n],
                        steps,
                        wallclock_times: vec![1; n],
                        values,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .is_ok();
            (c, ok)
        }
    };
    for _ in 0..20 {
        let (back, ok) = send(c, 500).await;
        c = back;
        assert!(ok);
    }
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        proc.kill().await;
    });
    loop {
        let (back, ok) = send(c, 500).await;
        c = back;
        if !ok {
            break;
        }
    }
    killer.await.unwrap();
    // Restart twice (the WAL replays the first time), then compare.
    for _ in 0..2 {
        let proc = Process::start(&data, &args).await;
        assert!(proc.terminate().await);
    }
    let proc = Process::start(&data, &args).await;
    let mut c = proc.client().await;
    let summary = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: "sum".into(),
            include_details: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiments[0]
        .metric_summaries
        .clone();
    // Brute force over exactly the points now in Parquet (acknowledged ones, and
    // unacknowledged batches that landed whole).
    let points: Vec<proto::MetricsValue> = metrics_of(&mut c, &id).await[0].values.clone();
    assert!(proc.terminate().await);
    let values: Vec<(u64, f64)> = points
        .iter()
        .map(|v| {
            let d = match v.value {
                Some(proto::metrics_value::Value::DVal(d)) => d,
                ref other => panic!("{other:?}"),
            };
            (v.step, d)
        })
        .collect();
    let [s] = summary.as_slice() else {
        panic!("{summary:?}");
    };
    assert_eq!(s.key, "loss");
    assert_eq!(s.count, values.len() as u64, "every point counted once");
    assert_eq!(
        s.min,
        values.iter().map(|v| v.1).fold(f64::INFINITY, f64::min)
    );
    assert_eq!(
        s.max,
        values.iter().map(|v| v.1).fold(f64::NEG_INFINITY, f64::max)
    );
    let top = values.iter().map(|v| v.0).max().unwrap();
    assert_eq!(s.last_step, top as i64);
    // Among equal top steps the latest ingested is last: the read returns them in
    // ingest order.
    assert_eq!(s.last, values.iter().rev().find(|v| v.0 == top).unwrap().1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modelbox_client_lists_a_namespace_of_100000_experiments() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let c = server.client().await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..64u32 {
        let mut c = c.clone();
        tasks.spawn(async move {
            for i in (t..100_000).step_by(64) {
                c.create_experiment(proto::CreateExperimentRequest {
                    name: format!("run-{i:06}"),
                    namespace: "big".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eprintln!(
        "100000 CreateExperiment calls from 64 tasks: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // A ModelBox 0.0.5 client: no page size, and tonic's default 4 MiB limit.
    let mut plain =
        proto::model_store_client::ModelStoreClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
    let r = plain
        .list_experiments(proto::ListExperimentsRequest {
            namespace: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.experiments.is_empty());
    assert!(
        !r.next_page_token.is_empty(),
        "the answer says that more exist"
    );
    // Newest first, at the index's millisecond resolution (ties in any order).
    let created: Vec<i64> = r
        .experiments
        .iter()
        .map(|e| {
            let t = e.created_at.expect("created_at");
            t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
        })
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {created:?}"
    );
    // Following the tokens lists every experiment once.
    let mut c = server.client().await;
    let mut token = r.next_page_token;
    let mut seen: std::collections::HashSet<String> =
        r.experiments.into_iter().map(|e| e.id).collect();
    while !token.is_empty() {
        let page = c
            .list_experiments(proto::ListExperimentsRequest {
                namespace: "big".into(),
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for e in page.experiments {
            assert!(seen.insert(e.id), "listed twice");
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 100_000);
    server.stop().await;
}
