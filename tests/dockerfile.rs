//! deploy/Dockerfile builds the same binary as the README's run command, runs it as
//! a non-root user with a data volume, and agrees with mboxd's defaults and flags.
//! (No Docker engine runs here; this reads the file, and checks the image's command
//! line against the real binary's flag parser.)

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

use std::path::Path;

use mboxd::config::Config;

fn instructions() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .unwrap();
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        pending.push_str(line.trim_end_matches('\\'));
        pending.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let (op, rest) = pending.trim().split_once(' ').unwrap();
        out.push((op.to_uppercase(), rest.trim().to_owned()));
        pending.clear();
    }
    out
}

fn json_args(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap()
}

#[test]
fn dockerfile_builds_the_readme_binary_and_matches_the_defaults() {
    let ins = instructions();
    let get = |op: &str| {
        ins.iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    };

    // Two stages: a Rust build stage and a small runtime.
    let from = get("FROM");
    assert_eq!(from.len(), 2, "{from:?}");
    assert!(
        from[0].starts_with("rust:") && from[0].ends_with(" AS build"),
        "{from:?}"
    );
    assert!(
        from[1].contains("-slim"),
        "runtime image should be small: {from:?}"
    );

    // The README runs `cargo run --release -- serve`: the release `mboxd` binary.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve"));
    let run = get("RUN");
    assert!(
        run.iter()
            .any(|r| r == "cargo build --release --locked --bin mboxd"),
        "{run:?}"
    );
    let copy = get("COPY");
    assert!(
        copy.iter()
            .any(|c| c == "--from=build /src/target/release/mboxd /usr/local/bin/mboxd"),
        "{copy:?}"
    );

    // Non-root, with the data folder as a volume it owns.
    let user = get("USER");
    assert_eq!(user.len(), 1);
    assert_ne!(user[0], "0");
    assert_ne!(user[0], "root");
    assert!(
        run.iter()
            .any(|r| r.contains(&format!("chown {0}:{0} /data", user[0]))),
        "{run:?}"
    );
    assert_eq!(get("VOLUME"), [r#"["/data"]"#]);

    // Ports agree with mboxd's defaults; the command line parses as the real binary's.
    let defaults = Config::default();
    let expose: Vec<u16> = get("EXPOSE")[0]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let grpc_port = defaults.listen.port();
    let metrics_port = defaults.http_listen.unwrap().port();
    assert_eq!(expose, [grpc_port, metrics_port]);
    let entrypoint = json_args(&get("ENTRYPOINT")[0]);
    let cmd = json_args(&get("CMD")[0]);
    assert_eq!(entrypoint, ["/usr/local/bin/mboxd", "serve"]);
    let flag = |name: &str| {
        cmd.iter()
            .position(|a| a == name)
            .map(|i| cmd[i + 1].clone())
            .unwrap()
    };
    assert_eq!(flag("--listen"), format!("0.0.0.0:{grpc_port}"));
    assert_eq!(flag("--metrics-listen"), format!("0.0.0.0:{metrics_port}"));
    assert_eq!(flag("--data-dir"), "/data");
    // `mboxd serve <CMD> --help` exits 0 only if clap accepts every flag in CMD.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mboxd"))
        .arg("serve")
        .args(&cmd)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
