//! The files in `deploy/` that are data: the Grafana dashboard is a valid dashboard model, and
//! the Prometheus files say what the sidecar serves.

use std::collections::HashSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fields Grafana's dashboard model (schemaVersion 39) requires of a dashboard and its
/// panels, checked one by one.
#[test]
fn grafana_dashboard_is_a_valid_dashboard_model() {
    let d: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/l4mesh-encryption.json")).expect("valid JSON");
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string());
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["name"] == "datasource" && v["type"] == "datasource"));
    let mut ids = HashSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id in {title}"
        );
        assert!(["timeseries", "table", "stat", "gauge"].contains(&p["type"].as_str().unwrap()));
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].is_u64(), "{title}: gridPos.{k}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(t["refId"].is_string() && t["expr"].is_string(), "{title}");
        }
    }
}

#[test]
fn prometheus_files_scrape_the_stats_port() {
    let scrape = read("deploy/prometheus/prometheus.yml");
    let v: serde_yaml::Value = serde_yaml::from_str(&scrape).unwrap();
    assert_eq!(v["scrape_configs"][0]["job_name"], "l4mesh-sidecars");
    assert!(scrape.contains("15020"));
    let pm: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/podmonitor.yaml")).unwrap();
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
}

/// Everything `deploy/kustomization.yaml` names exists (kustomize itself is not installed in
/// CI); the Dockerfile copies files that exist.
#[test]
fn kustomization_and_dockerfile_name_files_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let k: serde_yaml::Value = serde_yaml::from_str(&read("deploy/kustomization.yaml")).unwrap();
    let mut names: Vec<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for g in k["configMapGenerator"].as_sequence().unwrap() {
        for f in g["files"].as_sequence().unwrap() {
            names.push(f.as_str().unwrap().to_string());
        }
    }
    for n in names {
        assert!(
            root.join("deploy").join(&n).exists(),
            "kustomization names missing {n}"
        );
    }
    for line in read("deploy/Dockerfile").lines() {
        if let Some(rest) = line.strip_prefix("COPY ") {
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(root.join(src).exists(), "Dockerfile copies missing {src}");
            }
        }
    }
    // The image ships the binary without debug info (50 MB -> 9.4 MB).
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"));
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_DEBUG=0"));
}

fn version(v: &str) -> (u32, u32) {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// The host's target triple, as rustc names it (`x86_64-unknown-linux-gnu`).
fn host_triple() -> String {
    let out = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host")
}

/// The Dockerfile's build stage can build what Cargo.lock pins: Cargo.toml's rust-version is
/// at least every locked package's own, and the builder image at least that. (The builder was
/// once rust:1.86 while `time`, under x509-parser, needed 1.88: the image did not build.)
///
/// Only the packages a build for this host resolves are asked for (`--filter-platform`): the
/// image is built on Linux, and a Linux build never downloads `windows-*` or `hermit-abi`, so
/// asking cargo about every locked package failed offline on any fresh machine (issue 28).
/// Everything a Linux build needs is downloaded by the build of this very test.
#[test]
fn dockerfile_toolchain_builds_every_locked_dependency() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (needs, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    let declared = version(env!("CARGO_PKG_RUST_VERSION"));
    assert!(
        declared >= needs,
        "Cargo.toml rust-version {declared:?} < {needs:?}, which {by} needs"
    );
    let builder = read("deploy/Dockerfile")
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:")?.split('-').next().map(version))
        .expect("FROM rust:<version>-... in deploy/Dockerfile");
    assert!(
        builder >= declared,
        "builder {builder:?} < rust-version {declared:?}"
    );
}

/// deploy/image.sh builds the image from the Dockerfile's own steps; it reads them correctly.
#[test]
fn image_script_reads_its_steps_from_the_dockerfile() {
    let out = std::process::Command::new("bash")
        .args(["deploy/image.sh", "--plan"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8(out.stdout).unwrap();
    let dockerfile = read("deploy/Dockerfile");
    let expect = [
        "base: debian:bookworm-slim".to_string(),
        "packages: iptables iproute2 ca-certificates".to_string(),
        "binary: CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin l4mesh".to_string(),
        "copy: /src/target/release/l4mesh -> /usr/local/bin/l4mesh".to_string(),
        "copy: iptables/init.sh -> /usr/local/bin/l4mesh-iptables-init".to_string(),
        "chmod: 0755 /usr/local/bin/l4mesh-iptables-init".to_string(),
        "user: 1337:1337".to_string(),
        "entrypoint: l4mesh".to_string(),
        "cmd: run".to_string(),
    ];
    for line in expect {
        assert!(plan.contains(&line), "plan lacks {line:?}:\n{plan}");
        // What the plan says is what the Dockerfile says (not a copy kept in the script).
        let word = line.rsplit([' ', ':']).next().unwrap();
        assert!(dockerfile.contains(word), "{word} not in the Dockerfile");
    }
}
