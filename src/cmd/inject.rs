//! Injection: adds l4mesh to Kubernetes workloads, for `l4mesh inject` (YAML in, YAML out)
//! and the admission webhook (`l4mesh injector`). Not on the data path. Each pod template
//! gets an init container that installs the capture rules, the sidecar (as a native sidecar by
//! default, so the app starts only once it is ready), its volumes, and scrape annotations.
//! Everything else in the input is left as it was; injecting twice is the same as once.

use serde_yaml::{Mapping, Value};
use thiserror::Error;

use crate::consts;

/// Annotation (on the object or its pod template) that opts a workload out: `"false"`.
pub const INJECT: &str = "l4mesh.io/inject";
/// Set on injected pod templates (annotation and label).
pub const INJECTED: &str = "l4mesh.io/injected";
/// Optional annotations that shape the capture rules.
const CAPTURE_ANNOTATIONS: [(&str, &str); 4] = [
    ("l4mesh.io/inbound-ports", "L4MESH_INBOUND_PORTS"),
    (
        "l4mesh.io/exclude-inbound-ports",
        "L4MESH_EXCLUDE_INBOUND_PORTS",
    ),
    (
        "l4mesh.io/exclude-outbound-ports",
        "L4MESH_EXCLUDE_OUTBOUND_PORTS",
    ),
    (
        "l4mesh.io/exclude-outbound-cidrs",
        "L4MESH_EXCLUDE_OUTBOUND_CIDRS",
    ),
];
/// Annotation naming the Secret with the workload's certificate (default
/// `<serviceAccount>-l4mesh-certs`, as the example cert-manager `Certificate` names it).
const CERT_SECRET: &str = "l4mesh.io/cert-secret";

/// How to inject.
#[derive(Clone, Debug)]
pub struct Options {
    /// The l4mesh container image.
    pub image: String,
    /// Run the sidecar as a native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+); otherwise as the first container, holding the app until ready.
    pub native_sidecar: bool,
    /// The ConfigMap holding the mesh's policy file (optional in the pod).
    pub policy_configmap: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: "ghcr.io/l4mesh/l4mesh:0.1.0".to_string(),
            native_sidecar: true,
            policy_configmap: "l4mesh-policy".to_string(),
        }
    }
}

/// Why input could not be injected.
#[derive(Debug, Error)]
pub enum InjectError {
    #[error("document {index}: not valid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index} ({kind}): {reason}")]
    Shape {
        index: usize,
        kind: String,
        reason: String,
    },
}

/// Injects every workload in a multi-document YAML stream. Documents of other kinds pass
/// through unchanged.
pub fn inject_yaml(input: &str, opts: &Options) -> Result<String, InjectError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let index = i + 1;
        let mut value = Value::deserialize(doc).map_err(|e| InjectError::Yaml {
            index,
            reason: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, opts).map_err(|(kind, reason)| InjectError::Shape {
            index,
            kind,
            reason,
        })?;
        out.push(
            serde_yaml::to_string(&value).map_err(|e| InjectError::Yaml {
                index,
                reason: e.to_string(),
            })?,
        );
    }
    Ok(out.join("---\n"))
}

use serde::Deserialize;

/// Injects one object (recursing into `List`s). Returns whether anything changed.
pub fn inject_object(obj: &mut Value, opts: &Options) -> Result<bool, (String, String)> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let fail = |reason: &str| (kind.clone(), reason.to_string());
    if kind == "List" {
        let mut changed = false;
        let items = obj
            .get_mut("items")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| fail("a List without items"))?;
        for item in items {
            changed |= inject_object(item, opts)?;
        }
        return Ok(changed);
    }
    let template_path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(false),
    };
    if opted_out(obj) {
        return Ok(false);
    }
    let mut template = &mut *obj;
    for key in template_path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| fail(&format!("no {} in the pod template path", key)))?;
    }
    if opted_out(template) {
        return Ok(false);
    }
    inject_pod(template, opts).map_err(|r| fail(&r))
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get("annotations")?.get(key)?.as_str()
}

fn opted_out(obj: &Value) -> bool {
    annotation(obj, INJECT).is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Adds l4mesh to a pod (or pod template: `metadata` + `spec`).
fn inject_pod(pod: &mut Value, opts: &Options) -> Result<bool, String> {
    let pod_map = pod
        .as_mapping_mut()
        .ok_or("the pod template is not a mapping")?;
    if !pod_map.contains_key("spec") {
        return Err("the pod template has no spec".into());
    }
    let spec = pod_map
        .get("spec")
        .and_then(Value::as_mapping)
        .ok_or("spec is not a mapping")?;
    let has = |list: &str| {
        spec.get(list)
            .and_then(Value::as_sequence)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some("l4mesh"))
            })
    };
    if has("containers") || has("initContainers") {
        return Ok(false); // already injected
    }
    if !spec.get("containers").is_some_and(Value::is_sequence) {
        return Err("spec.containers is missing or not a list".into());
    }
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    if host_network {
        return Err(
            "hostNetwork pods share the node's network namespace and cannot be injected".into(),
        );
    }
    let service_account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();

    // Metadata: annotations and label.
    let meta = entry_mapping(pod_map, "metadata")?;
    let annotations_before = meta
        .get("annotations")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let secret = annotations_before
        .get(CERT_SECRET)
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{service_account}-l4mesh-certs"));
    let capture_env: Vec<Value> = CAPTURE_ANNOTATIONS
        .iter()
        .filter_map(|(ann, env)| {
            let v = annotations_before.get(*ann)?.as_str()?;
            Some(yaml(&format!("{{name: {env}, value: {}}}", json_str(v))))
        })
        .collect();
    {
        let annotations = entry_mapping(meta, "annotations")?;
        let stats_port = consts::STATS_PORT.to_string();
        for (k, v) in [
            (INJECTED, "true"),
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", stats_port.as_str()),
            ("prometheus.io/path", "/metrics"),
        ] {
            annotations.insert(k.into(), v.into());
        }
    }
    entry_mapping(meta, "labels")?.insert(INJECTED.into(), "true".into());

    // Spec: init container, sidecar, volumes.
    let spec = entry_mapping(pod_map, "spec")?;
    let mut init = vec![init_container(opts, capture_env)];
    let mut sidecar = sidecar_container(opts);
    // The app's declared ports: the sidecar's per-port metrics name them; other ports a
    // client picks are counted as `other` (bounded series).
    let app_ports: Vec<String> = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("ports")?.as_sequence())
        .flatten()
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .map(|p| p.to_string())
        .collect();
    if !app_ports.is_empty() {
        let env = sidecar.get_mut("env").and_then(Value::as_sequence_mut);
        if let Some(env) = env {
            env.push(yaml(&format!(
                "{{name: L4MESH_APP_PORTS, value: {}}}",
                json_str(&app_ports.join(","))
            )));
        }
    }
    if opts.native_sidecar {
        let mut s = sidecar;
        if let Some(m) = s.as_mapping_mut() {
            m.insert("restartPolicy".into(), "Always".into());
        }
        init.push(s);
        prepend(spec, "initContainers", init)?;
    } else {
        prepend(spec, "initContainers", init)?;
        let mut s = sidecar;
        // Classic ordering: the app containers start after this one's postStart returns,
        // which is when the sidecar is ready (as Istio's holdApplicationUntilProxyStarts).
        if let Some(m) = s.as_mapping_mut() {
            m.insert(
                "lifecycle".into(),
                yaml("{postStart: {exec: {command: [l4mesh, wait-ready, --timeout, 60s]}}, preStop: {exec: {command: [l4mesh, drain]}}}"),
            );
        }
        prepend(spec, "containers", vec![s])?;
    }
    let volumes = [
        yaml(&format!(
            "{{name: l4mesh-certs, secret: {{secretName: {}, items: [{{key: tls.crt, path: cert-chain.pem}}, {{key: tls.key, path: key.pem}}, {{key: ca.crt, path: root-cert.pem}}]}}}}",
            json_str(&secret)
        )),
        yaml(&format!(
            "{{name: l4mesh-policy, configMap: {{name: {}, optional: true}}}}",
            json_str(&opts.policy_configmap)
        )),
        yaml("{name: l4mesh-podinfo, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}"),
    ];
    append(spec, "volumes", volumes.to_vec())?;
    Ok(true)
}

fn init_container(opts: &Options, env: Vec<Value>) -> Value {
    let mut c = yaml(&format!(
        "{{name: l4mesh-init, image: {}, command: [l4mesh-iptables-init], resources: {{requests: {{cpu: 10m, memory: 16Mi}}, limits: {{cpu: 100m, memory: 64Mi}}}}, securityContext: {{runAsUser: 0, runAsGroup: 0, runAsNonRoot: false, privileged: false, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL], add: [NET_ADMIN, NET_RAW]}}}}}}",
        json_str(&opts.image)
    ));
    if !env.is_empty() {
        if let Some(m) = c.as_mapping_mut() {
            m.insert("env".into(), Value::Sequence(env));
        }
    }
    c
}

fn sidecar_container(opts: &Options) -> Value {
    yaml(&format!(
        r#"{{name: l4mesh, image: {}, args: [run],
            ports: [{{name: l4mesh-stats, containerPort: {stats}, protocol: TCP}}],
            env: [
              {{name: POD_NAMESPACE, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}},
              {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}},
              {{name: SERVICE_ACCOUNT, valueFrom: {{fieldRef: {{fieldPath: spec.serviceAccountName}}}}}},
              {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}],
            readinessProbe: {{httpGet: {{path: /healthz/ready, port: {stats}}}, periodSeconds: 2, failureThreshold: 30}},
            startupProbe: {{httpGet: {{path: /healthz/ready, port: {stats}}}, periodSeconds: 1, failureThreshold: 60}},
            lifecycle: {{preStop: {{exec: {{command: [l4mesh, drain]}}}}}},
            resources: {{requests: {{cpu: 10m, memory: 16Mi}}, limits: {{memory: 256Mi}}}},
            securityContext: {{runAsUser: {uid}, runAsGroup: {gid}, runAsNonRoot: true, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}},
            volumeMounts: [
              {{name: l4mesh-certs, mountPath: {certs}, readOnly: true}},
              {{name: l4mesh-policy, mountPath: {policy}, readOnly: true}},
              {{name: l4mesh-podinfo, mountPath: {podinfo}, readOnly: true}}]}}"#,
        json_str(&opts.image),
        stats = consts::STATS_PORT,
        uid = consts::PROXY_UID,
        gid = consts::PROXY_GID,
        certs = consts::CERTS_DIR,
        policy = consts::POLICY_DIR,
        podinfo = consts::PODINFO_DIR,
    ))
}

/// A YAML flow literal written in this file; a typo here is a bug, caught by the golden tests.
fn yaml(s: &str) -> Value {
    serde_yaml::from_str(s).expect("static injection template is valid YAML")
}

/// A string as a quoted YAML scalar (JSON strings are valid YAML).
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn entry_mapping<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    let v = m
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if v.is_null() {
        *v = Value::Mapping(Mapping::new());
    }
    v.as_mapping_mut()
        .ok_or_else(|| format!("{key} is not a mapping"))
}

fn list<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let v = m
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if v.is_null() {
        *v = Value::Sequence(Vec::new());
    }
    v.as_sequence_mut()
        .ok_or_else(|| format!("{key} is not a list"))
}

fn prepend(m: &mut Mapping, key: &str, items: Vec<Value>) -> Result<(), String> {
    let l = list(m, key)?;
    l.splice(0..0, items);
    Ok(())
}

fn append(m: &mut Mapping, key: &str, items: Vec<Value>) -> Result<(), String> {
    list(m, key)?.extend(items);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      serviceAccountName: web\n      containers:\n      - name: web\n        image: nginx\n";

    #[test]
    fn injecting_twice_is_injecting_once() {
        let once = inject_yaml(DEPLOYMENT, &Options::default()).unwrap();
        assert!(once.contains("l4mesh-init"));
        assert!(once.contains("restartPolicy: Always"));
        assert!(once.contains("secretName: web-l4mesh-certs"));
        assert_eq!(inject_yaml(&once, &Options::default()).unwrap(), once);
    }

    #[test]
    fn opt_out_and_other_kinds_pass_through() {
        let out = DEPLOYMENT.replace(
            "    metadata:\n      labels:",
            "    metadata:\n      annotations:\n        l4mesh.io/inject: \"false\"\n      labels:",
        );
        let injected = inject_yaml(&out, &Options::default()).unwrap();
        assert!(!injected.contains("l4mesh-init"));
        let svc =
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  ports:\n  - port: 80\n";
        assert!(!inject_yaml(svc, &Options::default())
            .unwrap()
            .contains("l4mesh"));
    }

    #[test]
    fn refuses_clearly() {
        let err = inject_yaml("kind: Pod\nmetadata: {name: p}\n", &Options::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document 1 (Pod): the pod template has no spec"),
            "{err}"
        );
        let err = inject_yaml(
            "kind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: true, containers: [{name: a, image: b}]}\n",
            &Options::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hostNetwork"), "{err}");
        assert!(inject_yaml("a: [", &Options::default()).is_err());
    }
}
