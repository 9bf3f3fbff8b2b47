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
