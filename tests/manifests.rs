//! Every manifest under deploy/ and every `l4mesh inject` output the golden files cover,
//! accepted by a real kube-apiserver (issue 30): a server-side dry run of each object, failing
//! on any error and on any warning the server sends back. An offline schema check cannot see
//! what the server drops or warns about (a projected volume whose sources the server does not
//! know, for one). Custom resources whose definitions are not installed (cert-manager's,
//! the Prometheus Operator's) are skipped, by name, loudly.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::apiserver::{self, ApiServer, ADDRESS, ADMIN_TOKEN};
use common::*;

/// Where an object of this kind is posted, and whether it lives in a namespace; `None` for a
/// custom resource this API server does not have.
fn resource(api_version: &str, kind: &str) -> Option<(String, bool)> {
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ];
    let base = match api_version {
        "v1" => "/api/v1".to_string(),
        v if [
            "apps/v1",
            "batch/v1",
            "rbac.authorization.k8s.io/v1",
            "admissionregistration.k8s.io/v1",
            "policy/v1",
        ]
        .contains(&v) =>
        {
            format!("/apis/{v}")
        }
        _ => return None,
    };
    let plural = format!("{}s", kind.to_lowercase());
    Some((format!("{base}/{plural}"), !cluster_scoped.contains(&kind)))
}

/// Every document of `files`, List items unpacked, as JSON, with where it came from.
fn documents(files: &[PathBuf]) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            let json: serde_json::Value = serde_json::to_value(value).unwrap();
            let name = format!("{}#{}", file.display(), i + 1);
            if json["kind"] == "List" {
                for (j, item) in json["items"].as_array().into_iter().flatten().enumerate() {
                    out.push((format!("{name}.items[{j}]"), item.clone()));
                }
            } else {
                out.push((name, json));
            }
        }
    }
    out
}

use serde::Deserialize;

/// POSTs `object` (a dry run unless `really`) as the administrator, from the API server's
/// own namespace; returns the HTTP status and every `Warning` header.
fn post(
    api: &ApiServer,
    path: &str,
    object: &serde_json::Value,
    really: bool,
) -> (u16, Vec<String>, String) {
    let body = api_dir(api).join("object.json");
    std::fs::write(&body, serde_json::to_vec(object).unwrap()).unwrap();
    let query = if really { "" } else { "?dryRun=All" };
    let out = Command::new("ip")
        .args(["netns", "exec", &api.netns, "curl", "-sS", "-i", "--cacert"])
        .arg(&api.ca)
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args([
            "-H",
            "Content-Type: application/json",
            "-X",
            "POST",
            "--data-binary",
        ])
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{ADDRESS}:6443{path}{query}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .lines()
        .find(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let warnings = text
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("warning:"))
        .map(|l| l.trim().to_string())
        .collect();
    (status, warnings, text)
}

fn api_dir(api: &ApiServer) -> PathBuf {
    api.ca.parent().unwrap().to_path_buf()
}

/// The files the test posts: deploy/'s manifests and the inject goldens.
fn files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        "deploy/kubernetes",
        "deploy/prometheus",
        "tests/fixtures/inject",
    ] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let yaml = name.ends_with(".yaml");
            let inject_input = dir.ends_with("inject") && !name.ends_with(".injected.yaml");
            if yaml && !inject_input {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// Posts every document; returns each refusal or warning, named by file and document.
fn check_all(api: &ApiServer, docs: &[(String, serde_json::Value)]) -> (Vec<String>, Vec<String>) {
    let (mut problems, mut skipped) = (Vec::new(), Vec::new());
    // Namespaces first, for real (dry runs of namespaced objects need them to exist): the
    // manifests' own Namespace objects as written (a second file declaring the same one gets
    // 409), then any other namespace an object names.
    for (name, d) in docs.iter().filter(|(_, d)| d["kind"] == "Namespace") {
        let (status, warnings, text) = post(api, "/api/v1/namespaces", d, true);
        if status != 201 && status != 409 {
            problems.push(format!("{name}: Namespace: HTTP {status}: {text}"));
        }
        problems.extend(
            warnings
                .into_iter()
                .map(|w| format!("{name}: Namespace: {w}")),
        );
    }
    let mut namespaces: BTreeSet<String> = docs
        .iter()
        .filter_map(|(_, d)| d["metadata"]["namespace"].as_str().map(str::to_string))
        .collect();
    namespaces.insert("default".into());
    for ns in &namespaces {
        let object =
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        let (status, _, text) = post(api, "/api/v1/namespaces", &object, true);
        assert!(status == 201 || status == 409, "namespace {ns}: {text}");
    }
    // And the service accounts pods run as (admission refuses a pod whose account is
    // missing), unless the manifests make them.
    let accounts: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Pod")
        .filter_map(|(_, d)| {
            let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
            let sa = d["spec"]["serviceAccountName"].as_str()?;
            Some((ns.to_string(), sa.to_string()))
        })
        .collect();
    for (ns, sa) in &accounts {
        let object = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
        let (status, _, text) = post(
            api,
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            &object,
            true,
        );
        assert!(
            status == 201 || status == 409,
            "service account {ns}/{sa}: {text}"
        );
    }
    for (name, doc) in docs.iter().filter(|(_, d)| d["kind"] != "Namespace") {
        let (api_version, kind) = (
            doc["apiVersion"].as_str().unwrap_or(""),
            doc["kind"].as_str().unwrap_or(""),
        );
        let Some((path, namespaced)) = resource(api_version, kind) else {
            skipped.push(format!(
                "{name}: {api_version} {kind} (its CustomResourceDefinition is not installed here)"
            ));
            continue;
        };
        let path = match namespaced {
            true => {
                let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                path.replacen(
                    &format!("/{}", path.rsplit('/').next().unwrap()),
                    &format!("/namespaces/{ns}/{}", path.rsplit('/').next().unwrap()),
                    1,
                )
            }
            false => path,
        };
        let (status, warnings, text) = post(api, &path, doc, false);
        if !(200..300).contains(&status) {
            let body = text.split("\r\n\r\n").last().unwrap_or("");
            let message = serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| body.to_string());
            problems.push(format!("{name}: {kind}: HTTP {status}: {message}"));
        }
        for w in warnings {
            problems.push(format!("{name}: {kind}: {w}"));
        }
    }
    (problems, skipped)
}

/// With the feature gates and API that Pod Certificates need, every manifest and inject
/// output is accepted without a warning; with the default gates, the pod-certificate output
/// is accepted but warned about (its projected sources dropped: the sidecar would start with
/// no credentials), and the test sees that warning.
#[test]
fn every_manifest_and_injected_pod_is_accepted_by_a_real_api_server() {
    if !privileged("manifests_dry_run") {
        return;
    }
    let Some(assets) = apiserver::assets("manifests_dry_run") else {
        return;
    };
    let docs = documents(&files());
    assert!(docs.len() > 20, "found only {} documents", docs.len());

    let c = Cluster::new("manifests", 1);
    let gates = [
        "--feature-gates=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true",
        "--runtime-config=certificates.k8s.io/v1beta1=true",
    ];
    let api = ApiServer::start_with(&c, &assets, &gates);
    let (problems, skipped) = check_all(&api, &docs);
    for s in &skipped {
        eprintln!("*** SKIPPED (no CRD): {s}");
    }
    assert!(
        problems.is_empty(),
        "refused or warned about, with the gates set:\n{}",
        problems.join("\n")
    );
    drop(api);

    // Default gates: the pod-certificate source is warned about, and that is caught.
    let c = Cluster::new("manifestsdef", 1);
    let api = ApiServer::start_with(&c, &assets, &[]);
    let pod_certificate: Vec<_> = docs
        .iter()
        .filter(|(n, _)| n.contains("cert-pod-certificate"))
        .cloned()
        .collect();
    assert!(!pod_certificate.is_empty());
    let (problems, _) = check_all(&api, &pod_certificate);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("has no sources provided")),
        "default gates: no warning caught for pod-certificate: {problems:?}"
    );
}

/// The injector's real path: deploy/'s MutatingWebhookConfiguration (its service reference
/// swapped for the injector's address, the caBundle for the CA that signed it) registered with
/// the API server, the injector serving HTTPS beside it, and a pod created through the API in
/// an opted-in namespace comes back with its sidecar, its init container and the injected
/// label; a pod that opts out comes back as it was.
#[test]
fn a_pod_created_through_the_api_server_is_injected_by_the_webhook() {
    if !privileged("webhook_round_trip") {
        return;
    }
    let Some(assets) = apiserver::assets("webhook_round_trip") else {
        return;
    };
    let c = Cluster::new("webhook", 1);
    let mut api = ApiServer::start(&c, &assets);
    let (cert, key) = api.serving_cert("injector", "127.0.0.1");
    let log = api.spawn_beside(
        "injector",
        Path::new(BIN),
        &[
            "injector",
            "--listen",
            "127.0.0.1:9443",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    wait_for_log(&log, "9443", std::time::Duration::from_secs(10));

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut webhook = documents(&[root.join("deploy/kubernetes/webhook.yaml")])
        .pop()
        .unwrap()
        .1;
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&api.ca).unwrap());
    webhook["webhooks"][0]["clientConfig"] =
        serde_json::json!({"url": "https://127.0.0.1:9443/inject", "caBundle": ca});
    let path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    let (status, _, text) = post(&api, path, &webhook, true);
    assert_eq!(status, 201, "{text}");

    let namespace = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"l4mesh.io/injection": "enabled"}}});
    assert_eq!(post(&api, "/api/v1/namespaces", &namespace, true).0, 201);
    let account = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "cart"}});
    assert_eq!(
        post(
            &api,
            "/api/v1/namespaces/shop/serviceaccounts",
            &account,
            true
        )
        .0,
        201
    );
    let pod = documents(&[root.join("tests/fixtures/inject/pod.yaml")])
        .pop()
        .unwrap()
        .1;
    // The webhook was just registered: the API server may take a moment to call it.
    let start = std::time::Instant::now();
    let created = loop {
        let mut attempt = pod.clone();
        attempt["metadata"]["name"] = format!("cart-{}", start.elapsed().as_millis()).into();
        let (status, warnings, text) = post(&api, "/api/v1/namespaces/shop/pods", &attempt, true);
        assert_eq!(status, 201, "{text}");
        assert!(warnings.is_empty(), "{warnings:?}");
        let body: serde_json::Value =
            serde_json::from_str(text.split("\r\n\r\n").last().unwrap()).unwrap();
        if body["metadata"]["labels"]["l4mesh.io/injected"] == "true" {
            break body;
        }
        assert!(start.elapsed().as_secs() < 20, "never injected: {body}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let names = |list: &serde_json::Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let init = names(&created["spec"]["initContainers"]);
    assert!(init.contains(&"l4mesh-init".to_string()), "{init:?}");
    // A native sidecar: an init container that keeps running.
    assert!(init.contains(&"l4mesh".to_string()), "{init:?}");

    // Opted out: as it was.
    let mut out = pod.clone();
    out["metadata"]["name"] = "opted-out".into();
    out["metadata"]["annotations"] = serde_json::json!({"l4mesh.io/inject": "false"});
    let (status, _, text) = post(&api, "/api/v1/namespaces/shop/pods", &out, true);
    assert_eq!(status, 201, "{text}");
    let body: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").last().unwrap()).unwrap();
    assert!(body["spec"]["initContainers"].is_null(), "{body}");
    assert!(body["metadata"]["labels"]["l4mesh.io/injected"].is_null());
}
