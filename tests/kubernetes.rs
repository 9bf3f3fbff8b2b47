//! Kubernetes: `l4mesh inject` golden files for every workload kind, the admission webhook
//! (its JSONPatch gives exactly what `inject` gives), schema validation of every manifest
//! and inject output, and the init container's command run as the manifest gives it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use l4mesh::cmd::inject::{inject_yaml, Options};
use serde_json::{json, Value};

use common::*;

/// Workload kinds, then the certificate sources other than the default Secret (issue 18):
/// cert-manager's csi-driver-spiffe, Kubernetes Pod Certificates, SPIRE via spiffe-helper.
const KINDS: [&str; 12] = [
    "pod",
    "deployment",
    "statefulset",
    "daemonset",
    "replicaset",
    "job",
    "cronjob",
    "list",
    "cert-csi-driver-spiffe",
    "cert-pod-certificate",
    "cert-spire",
    "pod-no-token",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/inject")
        .join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn inject_matches_the_golden_file_of_every_kind_and_is_idempotent() {
    for kind in KINDS {
        let input = read(&fixture(&format!("{kind}.yaml")));
        let golden = read(&fixture(&format!("{kind}.injected.yaml")));
        let out = inject_yaml(&input, &Options::default()).unwrap();
        assert_eq!(out, golden, "{kind}: inject differs from its golden file");
        assert_eq!(
            inject_yaml(&golden, &Options::default()).unwrap(),
            golden,
            "{kind}: injecting an injected file changed it"
        );
    }
    let classic = Options {
        native_sidecar: false,
        ..Options::default()
    };
    let out = inject_yaml(&read(&fixture("pod.yaml")), &classic).unwrap();
    assert_eq!(out, read(&fixture("pod.classic.injected.yaml")));
    // The opted-out Deployment in the List is untouched.
    let list: serde_yaml::Value =
        serde_yaml::from_str(&read(&fixture("list.injected.yaml"))).unwrap();
    let legacy = &list["items"][2];
    assert_eq!(legacy["metadata"]["name"], "legacy");
    assert!(!serde_yaml::to_string(legacy)
        .unwrap()
        .contains("l4mesh-init"));
}

/// An AdmissionReview for `pod` (JSON), as the API server sends it.
fn review(pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false
        }
    }))
    .unwrap()
}

/// Applies the `add`/`replace` operations of a JSONPatch (RFC 6902) to `doc`.
fn apply_patch(doc: &mut Value, patch: &[Value]) {
    for op in patch {
        let kind = op["op"].as_str().unwrap();
        assert!(kind == "add" || kind == "replace", "unexpected op {op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let target = if parent.is_empty() {
            &mut *doc
        } else {
            doc.pointer_mut(parent)
                .unwrap_or_else(|| panic!("no {parent}"))
        };
        let last = last.replace("~1", "/").replace("~0", "~");
        if kind == "replace" {
            assert!(target.get(&last).is_some(), "replace of a missing {path}");
        }
        target[last] = op["value"].clone();
    }
}

fn pod_json() -> Value {
    let pod: serde_yaml::Value = serde_yaml::from_str(&read(&fixture("pod.yaml"))).unwrap();
    serde_json::to_value(pod).unwrap()
}

#[test]
fn webhook_patch_gives_exactly_what_inject_gives() {
    let pod = pod_json();
    let (status, answer) = l4mesh::cmd::injector::review(&review(&pod), &Options::default());
    assert_eq!(status, 200);
    let response = &answer["response"];
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let mut patched = pod.clone();
    apply_patch(&mut patched, &patch);
    let injected: serde_yaml::Value =
        serde_yaml::from_str(&read(&fixture("pod.injected.yaml"))).unwrap();
    assert_eq!(patched, serde_json::to_value(injected).unwrap());
}

#[test]
fn webhook_leaves_opted_out_and_other_objects_alone_and_answers_bad_requests_cleanly() {
    let mut pod = pod_json();
    pod["metadata"]["annotations"]["l4mesh.io/inject"] = json!("false");
    let (status, answer) = l4mesh::cmd::injector::review(&review(&pod), &Options::default());
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // A pod that cannot be injected is admitted unchanged, with a warning.
    let mut host = pod_json();
    host["spec"]["hostNetwork"] = json!(true);
    let (_, answer) = l4mesh::cmd::injector::review(&review(&host), &Options::default());
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"]["warnings"][0]
        .as_str()
        .unwrap()
        .contains("hostNetwork"));

    // A pod-certificate pod is injected, and the cluster's needs are said (issue 30).
    let mut pc = pod_json();
    pc["metadata"]["annotations"]["l4mesh.io/cert-source"] = json!("pod-certificate");
    pc["metadata"]["annotations"]["l4mesh.io/cert-signer"] = json!("example.com/spiffe");
    let (_, answer) = l4mesh::cmd::injector::review(&review(&pc), &Options::default());
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"].get("patch").is_some());
    let warning = answer["response"]["warnings"][0].as_str().unwrap_or("");
    assert!(warning.contains("PodCertificateRequest=true"), "{answer}");

    // And `l4mesh inject` says it on stderr, the output unchanged.
    let out = Command::new(BIN)
        .arg("inject")
        .arg(fixture("cert-pod-certificate.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        read(&fixture("cert-pod-certificate.injected.yaml"))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("PodCertificateRequest=true"));

    // A pod whose l4mesh annotations cannot be read is refused, not admitted without its
    // sidecar: a typo must not leave a workload outside the mesh (and its clients falling
    // back to plaintext, as they do for an unmeshed server).
    for (annotation, value, says) in [
        (
            "l4mesh.io/cert-source",
            "spirre",
            "\"spirre\" is not one of",
        ),
        (
            "l4mesh.io/exclude-outbound-cidrs",
            "10.0.0.0/33",
            "l4mesh.io/exclude-outbound-cidrs",
        ),
        (
            "l4mesh.io/inbound-ports",
            "8080,http",
            "l4mesh.io/inbound-ports",
        ),
        (
            "l4mesh.io/exclude-inbound-ports",
            "70000",
            "l4mesh.io/exclude-inbound-ports",
        ),
    ] {
        let mut typo = pod_json();
        typo["metadata"]["annotations"][annotation] = json!(value);
        let (status, answer) = l4mesh::cmd::injector::review(&review(&typo), &Options::default());
        assert_eq!(status, 200);
        let response = &answer["response"];
        assert_eq!(response["allowed"], false, "{annotation}: {answer}");
        assert!(response.get("patch").is_none(), "{answer}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("l4mesh: not injected") && message.contains(says),
            "{annotation}: {message}"
        );
    }

    for (body, what) in [
        (&b"{not json"[..], "not JSON"),
        (
            &br#"{"kind":"AdmissionReview","request":{}}"#[..],
            "request.uid",
        ),
        (&br#"[1,2,3]"#[..], "AdmissionReview"),
    ] {
        let (status, answer) = l4mesh::cmd::injector::review(body, &Options::default());
        assert_eq!(status, 400);
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{message}");
    }
}

/// The webhook over real HTTPS, as the API server calls it.
#[test]
fn webhook_serves_admission_reviews_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let tls = dir.path().join("tls");
    sh(&[BIN, "certs", "ca", "--out", ca.to_str().unwrap()]);
    issue_certs(&ca, &tls, "l4mesh-system", "injector", "24h");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut injector = Command::new(BIN)
        .args(["injector", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(tls.join("cert-chain.pem"))
        .arg("--tls-key")
        .arg(tls.join("key.pem"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let body = dir.path().join("review.json");
    std::fs::write(&body, review(&pod_json())).unwrap();
    let mut answer = String::new();
    for _ in 0..50 {
        let out = Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "5",
                "-H",
                "Content-Type: application/json",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!("https://127.0.0.1:{port}/inject"))
            .output();
        if let Ok(out) = out {
            answer = String::from_utf8_lossy(&out.stdout).into_owned();
            if !answer.is_empty() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A pod with a mistyped annotation is refused, and the injector counts what it did.
    let mut typo = pod_json();
    typo["metadata"]["annotations"]["l4mesh.io/cert-source"] = json!("spirre");
    std::fs::write(&body, review(&typo)).unwrap();
    let data = format!("@{}", body.display());
    let url = format!("https://127.0.0.1:{port}");
    let refused = curl(&["--data-binary", &data, &format!("{url}/inject")]);
    let metrics = curl(&[&format!("{url}/metrics")]);
    let _ = injector.kill();
    let _ = injector.wait();
    let answer: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let refused: Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["response"]["allowed"], false, "{refused}");
    for line in [
        "l4mesh_injector_reviews_total{result=\"injected\"} 1",
        "l4mesh_injector_reviews_total{result=\"refused\"} 1",
        "l4mesh_injector_reviews_total{result=\"skipped\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
}

/// Every manifest in deploy/ and every inject output, against the Kubernetes OpenAPI schemas
/// (offline, kubernetes-validate from PyPI). Custom resources (cert-manager, Prometheus
/// Operator) have no schema there and are checked for shape only.
#[test]
fn manifests_and_inject_outputs_pass_kubernetes_schema_validation() {
    let found = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        let msg = "kubernetes-validate is not installed (pip install kubernetes-validate)";
        if std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("{msg}");
        }
        eprintln!("\n*** SKIPPED schema validation: {msg} ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    // One document per file, List items unpacked (there is no schema for List).
    let mut split = |name: &str, text: &str| {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let items = if v["kind"] == "List" {
                v["items"].as_sequence().unwrap().clone()
            } else {
                vec![v]
            };
            for (j, item) in items.into_iter().enumerate() {
                let path = dir.path().join(format!("{name}-{i}-{j}.yaml"));
                std::fs::write(&path, serde_yaml::to_string(&item).unwrap()).unwrap();
                files.push((path, item["kind"].as_str().unwrap_or("").to_string()));
            }
        }
    };
    for kind in KINDS {
        split(kind, &read(&fixture(&format!("{kind}.injected.yaml"))));
    }
    split("classic", &read(&fixture("pod.classic.injected.yaml")));
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&deploy)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 5,
        "deploy/kubernetes has too few manifests"
    );
    for m in &manifests {
        let name = m.file_stem().unwrap().to_string_lossy().into_owned();
        split(&name, &read(m));
    }
    let custom = ["Certificate", "ClusterIssuer", "Issuer", "PodMonitor"];
    let mut checked = 0;
    for (path, kind) in &files {
        if custom.contains(&kind.as_str()) {
            continue;
        }
        // Without -k, kubernetes-validate uses the newest schema it has (1.37 today), the
        // one with Pod Certificates (the cert-pod-certificate fixture).
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success()
                && !text.contains("ERROR")
                && !text.contains("Couldn't find schema"),
            "{kind} in {}: {text}\n{}",
            path.display(),
            read(path)
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} resources validated");
}

/// The init container's command, with the environment the injected manifest gives it, run in
/// a fresh network namespace: it installs the same capture rules the end-to-end tests use,
/// with the pod's annotations applied.
#[test]
fn the_init_container_command_sets_up_capture_as_the_manifest_gives_it() {
    if !privileged("init_container_command") {
        return;
    }
    let pod: serde_yaml::Value =
        serde_yaml::from_str(&read(&fixture("pod.injected.yaml"))).unwrap();
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "l4mesh-init");
    let command: Vec<String> = init["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let env: Vec<String> = init["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}={}",
                e["name"].as_str().unwrap(),
                e["value"].as_str().unwrap()
            )
        })
        .collect();
    // The image puts l4mesh and iptables/init.sh (as l4mesh-iptables-init) on PATH.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(BIN, bin.path().join("l4mesh")).unwrap();
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("iptables/init.sh"),
        bin.path().join("l4mesh-iptables-init"),
    )
    .unwrap();
    let c = Cluster::new("initc", 1);
    let path = format!(
        "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
        bin.path().display()
    );
    let mut args: Vec<&str> = vec!["env", &path];
    args.extend(env.iter().map(String::as_str));
    args.extend(command.iter().map(String::as_str));
    c.pod(0).exec(&args);
    let rules = c.pod(0).exec(&["iptables-save", "-t", "nat"]);
    for line in
        read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("iptables/rules-v4.golden")).lines()
    {
        if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap();
            assert!(
                rules.contains(&format!("-A {chain}")),
                "missing {line}:\n{rules}"
            );
        }
    }
    assert!(
        rules.contains("--dport 5432 -j RETURN"),
        "the annotation's exclusion is missing:\n{rules}"
    );
    assert!(
        rules.contains("REDIRECT --to-ports 15006") && rules.contains("REDIRECT --to-ports 15001")
    );
}

/// A bad `--trust-domain` or `--outbound-rules` is refused by the injector itself, not by
/// every pod it injects.
#[test]
fn inject_refuses_bad_mesh_wide_options() {
    let inject = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("inject")
            .args(args)
            .arg("-f")
            .arg(fixture("pod.yaml"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    };
    let (code, _, err) = inject(&["--trust-domain", "Bad/Domain"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("--trust-domain") && err.contains("invalid trust domain \"Bad/Domain\""),
        "{err}"
    );
    let (code, out, err) = inject(&["--trust-domain", "example.org"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("value: example.org"), "{out}");
    // Outbound rules likewise: the flag is read as the sidecar will read it.
    let (code, _, err) = inject(&[
        "--outbound-rules",
        "[{cidrs: [10.96.0.0/33], action: direct}]",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("--outbound-rules") && err.contains("rules[0].cidrs"),
        "{err}"
    );
}
