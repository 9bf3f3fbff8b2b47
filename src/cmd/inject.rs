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
/// Annotation choosing where the pod's certificate comes from: `secret` (the default),
/// `csi-driver-spiffe`, `pod-certificate` or `spire` (see [`CertSource`]).
pub const CERT_SOURCE: &str = "l4mesh.io/cert-source";
/// What a cluster needs for `l4mesh.io/cert-source: pod-certificate`: without it the API
/// server drops the projected sources silently and the sidecar starts with no credentials
/// (issue 30, seen on a real kube-apiserver 1.36 with default gates).
/// Set on a sidecar whose credentials come from Kubernetes Pod Certificates.
pub const ENV_CERT_SOURCE: &str = "L4MESH_CERT_SOURCE";
pub const POD_CERTIFICATE_NEEDS: &str = "l4mesh.io/cert-source pod-certificate needs the API server's --feature-gates=PodCertificateRequest=true,ClusterTrustBundle=true,ClusterTrustBundleProjection=true and --runtime-config=certificates.k8s.io/v1beta1=true (and the kubelet's gates); without them the pod starts with no credentials";
/// `pod-certificate`: the signer the kubelet asks (required) and the key type it generates.
const CERT_SIGNER: &str = "l4mesh.io/cert-signer";
const CERT_KEY_TYPE: &str = "l4mesh.io/cert-key-type";
/// `spire`: the spiffe-helper image.
const SPIFFE_HELPER_IMAGE: &str = "l4mesh.io/spiffe-helper-image";
/// The port spiffe-helper's health endpoint listens on (its startup probe): excluded from
/// inbound capture, since the kubelet probes it before the sidecar runs.
const SPIFFE_HELPER_HEALTH_PORT: u16 = 15029;

/// Where a pod's certificate, key and trust bundle come from. Every source ends as files in
/// the sidecar's certificate folder, which it watches and reloads; the sources differ in who
/// writes them.
#[derive(Clone, Debug, PartialEq)]
enum CertSource {
    /// A Secret (cert-manager `Certificate` per service account): `tls.crt`, `tls.key`,
    /// `ca.crt`. Every pod of the service account shares the key.
    Secret(String),
    /// cert-manager's csi-driver-spiffe: a per-pod key made on the node and a SPIFFE SVID,
    /// renewed by the driver (`tls.crt`, `tls.key`, `ca.crt`).
    CsiDriverSpiffe,
    /// Kubernetes Pod Certificates (KEP-4317): the kubelet makes the key, asks `signer` and
    /// writes key and chain in one credential bundle; the trust bundle comes from the
    /// signer's ClusterTrustBundles.
    PodCertificate { signer: String, key_type: String },
    /// SPIRE: spiffe-helper, a native sidecar beside l4mesh, fetches the SVID from the SPIRE
    /// agent's Workload API (SPIFFE CSI driver socket) and writes the files.
    Spire { helper_image: String },
}

const KEY_TYPES: [&str; 6] = [
    "ECDSAP256",
    "ECDSAP384",
    "ECDSAP521",
    "ED25519",
    "RSA3072",
    "RSA4096",
];

impl CertSource {
    fn from_annotations(annotations: &Mapping, service_account: &str) -> Result<Self, String> {
        let get = |key: &str| annotations.get(key).and_then(Value::as_str);
        match get(CERT_SOURCE).unwrap_or("secret") {
            "secret" => Ok(CertSource::Secret(
                get(CERT_SECRET)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{service_account}-l4mesh-certs")),
            )),
            "csi-driver-spiffe" => Ok(CertSource::CsiDriverSpiffe),
            "pod-certificate" => {
                let signer = get(CERT_SIGNER).ok_or_else(|| {
                    format!("{CERT_SOURCE}: pod-certificate needs {CERT_SIGNER} (the signerName the kubelet asks)")
                })?;
                let key_type = get(CERT_KEY_TYPE).unwrap_or("ECDSAP256");
                if !KEY_TYPES.contains(&key_type) {
                    return Err(format!(
                        "{CERT_KEY_TYPE}: {key_type:?} is not one of {}",
                        KEY_TYPES.join(", ")
                    ));
                }
                Ok(CertSource::PodCertificate {
                    signer: signer.to_string(),
                    key_type: key_type.to_string(),
                })
            }
            "spire" => Ok(CertSource::Spire {
                helper_image: get(SPIFFE_HELPER_IMAGE)
                    .unwrap_or(DEFAULT_SPIFFE_HELPER_IMAGE)
                    .to_string(),
            }),
            other => Err(format!(
                "{CERT_SOURCE}: {other:?} is not one of secret, csi-driver-spiffe, pod-certificate, spire"
            )),
        }
    }

    /// Where the sidecar finds the files, when not at the defaults (`cert-chain.pem`,
    /// `key.pem`, `root-cert.pem`): environment for the sidecar container.
    fn env(&self) -> Vec<EnvVar> {
        let at = |file: &str| format!("{}/{file}", consts::CERTS_DIR);
        let files = |chain: &str, key: &str, bundle: &str| {
            vec![
                EnvVar::value(ENV_CERT_CHAIN, &at(chain)),
                EnvVar::value(ENV_PRIVATE_KEY, &at(key)),
                EnvVar::value(ENV_TRUST_BUNDLE, &at(bundle)),
            ]
        };
        match self {
            CertSource::Secret(_) | CertSource::Spire { .. } => Vec::new(),
            CertSource::CsiDriverSpiffe => files("tls.crt", "tls.key", "ca.crt"),
            // Key and chain in one file: both settings name it. The source is named too, so
            // that a sidecar finding no file can say what the cluster probably lacks.
            CertSource::PodCertificate { .. } => {
                let mut env = files(CREDENTIAL_BUNDLE, CREDENTIAL_BUNDLE, "root-cert.pem");
                env.push(EnvVar::value(ENV_CERT_SOURCE, "pod-certificate"));
                env
            }
        }
    }

    fn volumes(&self) -> Vec<Volume> {
        match self {
            CertSource::Secret(name) => vec![Volume::secret(name)],
            CertSource::CsiDriverSpiffe => vec![Volume::csi_driver_spiffe()],
            CertSource::PodCertificate { signer, key_type } => {
                vec![Volume::pod_certificate(signer, key_type)]
            }
            CertSource::Spire { .. } => Volume::spire(),
        }
    }
}

/// spiffe-helper's image when the pod does not name one.
const DEFAULT_SPIFFE_HELPER_IMAGE: &str = "ghcr.io/spiffe/spiffe-helper:0.10.1";
/// The ConfigMap with spiffe-helper's `helper.conf` (deploy/kubernetes/spire-helper.yaml).
const SPIFFE_HELPER_CONFIGMAP: &str = "l4mesh-spiffe-helper";
/// The file the kubelet writes a Pod Certificate's key and chain to.
const CREDENTIAL_BUNDLE: &str = "credential-bundle.pem";
/// The sidecar's own Kubernetes API credentials, where every client looks for them.
const KUBE_API_ACCESS: &str = "l4mesh-kube-api-access";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
pub use crate::config::{
    ENV_CERT_CHAIN, ENV_OUTBOUND_RULES, ENV_PRIVATE_KEY, ENV_TRUST_BUNDLE, ENV_TRUST_DOMAIN,
    ENV_TRUST_DOMAIN_ALIASES,
};

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
    /// The mesh's trust domain, when not `cluster.local`, and its aliases (set in the
    /// sidecar's environment).
    pub trust_domain: Option<String>,
    pub trust_domain_aliases: Vec<String>,
    /// Outbound rules (a YAML list) for every sidecar, before its own.
    pub outbound_rules: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: "ghcr.io/l4mesh/l4mesh:0.1.0".to_string(),
            native_sidecar: true,
            policy_configmap: "l4mesh-policy".to_string(),
            trust_domain: None,
            trust_domain_aliases: Vec::new(),
            outbound_rules: None,
        }
    }
}

/// Why a pod template was not injected.
#[derive(Debug, Error)]
pub enum NotInjected {
    /// The pod cannot carry a sidecar (it shares the node's network): the webhook admits it
    /// as it is, with a warning.
    #[error("{0}")]
    Unsupported(String),
    /// The pod asks for something l4mesh cannot read (an annotation's value, a malformed
    /// spec): the webhook refuses it, so that a typo never leaves a workload outside the mesh.
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for NotInjected {
    fn from(reason: String) -> Self {
        NotInjected::Invalid(reason)
    }
}

impl From<&str> for NotInjected {
    fn from(reason: &str) -> Self {
        NotInjected::Invalid(reason.to_string())
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
            reason: reason.to_string(),
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

use serde::{Deserialize, Serialize};

/// A capture annotation's value, checked as `l4mesh iptables apply` will read it and written
/// the way it reads it (`8080, 9090` becomes `8080,9090`): a value it would refuse must stop
/// the injection here, not the pod's init container on every start.
fn capture_value(annotation: &str, value: &Value) -> Result<String, String> {
    let bad = |why: String| format!("{annotation}: {value:?}: {why}");
    let Some(text) = value.as_str() else {
        return Err(bad("not a string".into()));
    };
    let items = || text.split(',').map(str::trim).filter(|i| !i.is_empty());
    let ports = || {
        items()
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|e| bad(format!("port {p:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let joined = |v: Vec<String>| v.join(",");
    match annotation {
        "l4mesh.io/inbound-ports" if text.trim() == "*" => Ok("*".into()),
        "l4mesh.io/inbound-ports" if items().next().is_none() => {
            Err(bad("expected `*` or comma-separated ports".into()))
        }
        "l4mesh.io/exclude-outbound-cidrs" => items()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .map(|n| n.to_string())
                    .map_err(|e| bad(format!("{n:?}: {e} (write a network such as 10.0.0.0/8)")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(joined),
        _ => Ok(joined(ports()?.iter().map(u16::to_string).collect())),
    }
}

/// Injects one object (recursing into `List`s). Returns whether anything changed.
pub fn inject_object(obj: &mut Value, opts: &Options) -> Result<bool, (String, NotInjected)> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let fail = |reason: &str| (kind.clone(), NotInjected::from(reason));
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
    inject_pod(template, opts).map_err(|r| (kind.clone(), r))
}

fn annotation<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get("annotations")?.get(key)?.as_str()
}

fn opted_out(obj: &Value) -> bool {
    annotation(obj, INJECT).is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// Adds l4mesh to a pod (or pod template: `metadata` + `spec`).
fn inject_pod(pod: &mut Value, opts: &Options) -> Result<bool, NotInjected> {
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
        return Err(NotInjected::Unsupported(
            "hostNetwork pods share the node's network namespace and cannot be injected".into(),
        ));
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
    let source = CertSource::from_annotations(&annotations_before, &service_account)?;
    if matches!(source, CertSource::Spire { .. }) && !opts.native_sidecar {
        return Err(NotInjected::Invalid(format!(
            "{CERT_SOURCE}: spire needs native sidecars (Kubernetes 1.29+): spiffe-helper must have written the certificate before l4mesh starts"
        )));
    }
    let mut capture_env = Vec::new();
    for (ann, env) in CAPTURE_ANNOTATIONS {
        if let Some(v) = annotations_before.get(ann) {
            capture_env.push(EnvVar::value(env, &capture_value(ann, v)?));
        }
    }
    if matches!(source, CertSource::Spire { .. }) {
        // The kubelet probes spiffe-helper before the sidecar runs: not captured.
        let port = SPIFFE_HELPER_HEALTH_PORT.to_string();
        match capture_env
            .iter_mut()
            .find(|e| e.name == "L4MESH_EXCLUDE_INBOUND_PORTS")
        {
            Some(e) => {
                let v = e.value.get_or_insert_with(String::new);
                *v = format!("{v},{port}");
            }
            None => capture_env.push(EnvVar::value("L4MESH_EXCLUDE_INBOUND_PORTS", &port)),
        }
    }
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
    // An app that opts out of its API token leaves the sidecar without one too, unless it
    // gets its own (the Kubernetes source needs it; the app still has none).
    let api_token = spec
        .get("automountServiceAccountToken")
        .and_then(Value::as_bool)
        == Some(false);
    let init = value(&InitContainer::new(opts, capture_env))?;
    let sidecar = value(&SidecarContainer::new(
        opts,
        &app_ports,
        source.env(),
        api_token,
    ))?;
    if let CertSource::Spire { helper_image } = &source {
        let helper = value(&SpiffeHelper::new(helper_image))?;
        prepend(spec, "initContainers", vec![init, helper, sidecar])?;
    } else if opts.native_sidecar {
        prepend(spec, "initContainers", vec![init, sidecar])?;
    } else {
        prepend(spec, "initContainers", vec![init])?;
        prepend(spec, "containers", vec![sidecar])?;
    }
    let mut volumes = source.volumes();
    volumes.extend([
        Volume::config_map(&opts.policy_configmap),
        Volume::pod_labels(),
    ]);
    if api_token {
        volumes.push(Volume::kube_api_access());
    }
    let volumes = volumes.iter().map(value).collect::<Result<_, _>>()?;
    append(spec, "volumes", volumes)?;
    Ok(true)
}

fn value<T: Serialize>(t: &T) -> Result<Value, String> {
    serde_yaml::to_value(t).map_err(|e| e.to_string())
}

// What l4mesh adds to a pod, as typed values (serialized in field order, which is the order
// the golden files show). Only the fields l4mesh sets are modelled.

/// The init container: installs the capture rules, then exits.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitContainer {
    name: &'static str,
    image: String,
    command: [&'static str; 1],
    resources: Resources,
    security_context: SecurityContext,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    env: Vec<EnvVar>,
}

impl InitContainer {
    fn new(opts: &Options, env: Vec<EnvVar>) -> Self {
        InitContainer {
            name: "l4mesh-init",
            image: opts.image.clone(),
            command: ["l4mesh-iptables-init"],
            resources: Resources {
                requests: Quantities::new(Some("10m"), "16Mi"),
                limits: Quantities::new(Some("100m"), "64Mi"),
            },
            // Root with NET_ADMIN and NET_RAW for iptables, and nothing else.
            security_context: SecurityContext {
                run_as_user: 0,
                run_as_group: 0,
                run_as_non_root: false,
                privileged: Some(false),
                allow_privilege_escalation: false,
                read_only_root_filesystem: true,
                capabilities: Capabilities {
                    drop: ["ALL"],
                    add: Some(vec!["NET_ADMIN", "NET_RAW"]),
                },
            },
            env,
        }
    }
}

/// The sidecar: a native sidecar (`restartPolicy: Always` among the init containers) or,
/// classic, the first app container, holding the others until it is ready.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SidecarContainer {
    name: &'static str,
    image: String,
    args: [&'static str; 1],
    ports: [ContainerPort; 1],
    env: Vec<EnvVar>,
    readiness_probe: Probe,
    startup_probe: Probe,
    lifecycle: Lifecycle,
    resources: Resources,
    security_context: SecurityContext,
    volume_mounts: Vec<VolumeMount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_policy: Option<&'static str>,
}

impl SidecarContainer {
    /// `api_token`: mount the sidecar's own Kubernetes API credentials (the app opted out).
    fn new(opts: &Options, app_ports: &[String], cert_env: Vec<EnvVar>, api_token: bool) -> Self {
        let field = EnvVar::field;
        let mut env = vec![
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_NAME", "metadata.name"),
            field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field("POD_IP", "status.podIP"),
            // For `internalTrafficPolicy: Local` Services (the Kubernetes source, issue 24).
            field("NODE_NAME", "spec.nodeName"),
        ];
        if !app_ports.is_empty() {
            env.push(EnvVar::value("L4MESH_APP_PORTS", &app_ports.join(",")));
        }
        env.extend(cert_env);
        if let Some(td) = &opts.trust_domain {
            env.push(EnvVar::value(ENV_TRUST_DOMAIN, td));
        }
        if !opts.trust_domain_aliases.is_empty() {
            env.push(EnvVar::value(
                ENV_TRUST_DOMAIN_ALIASES,
                &opts.trust_domain_aliases.join(","),
            ));
        }
        if let Some(rules) = &opts.outbound_rules {
            env.push(EnvVar::value(ENV_OUTBOUND_RULES, rules));
        }
        let ready = |period_seconds, failure_threshold| Probe {
            http_get: HttpGet {
                path: "/healthz/ready",
                port: consts::STATS_PORT,
            },
            period_seconds,
            failure_threshold,
        };
        let exec = |command: &[&'static str]| Handler {
            exec: Exec {
                command: command.to_vec(),
            },
        };
        let mount = |name, mount_path| VolumeMount {
            name,
            mount_path,
            read_only: true,
        };
        SidecarContainer {
            name: "l4mesh",
            image: opts.image.clone(),
            args: ["run"],
            ports: [ContainerPort {
                name: "l4mesh-stats",
                container_port: consts::STATS_PORT,
                protocol: "TCP",
            }],
            env,
            readiness_probe: ready(2, 30),
            startup_probe: ready(1, 60),
            lifecycle: Lifecycle {
                // Classic ordering: the app containers start after this one's postStart
                // returns, which is when the sidecar is ready (as Istio's
                // holdApplicationUntilProxyStarts).
                post_start: (!opts.native_sidecar)
                    .then(|| exec(&["l4mesh", "wait-ready", "--timeout", "60s"])),
                pre_stop: exec(&["l4mesh", "drain"]),
            },
            resources: Resources {
                requests: Quantities::new(Some("10m"), "16Mi"),
                limits: Quantities::new(None, "256Mi"),
            },
            security_context: SecurityContext::proxy_user(),
            volume_mounts: [
                mount("l4mesh-certs", consts::CERTS_DIR),
                mount("l4mesh-policy", consts::POLICY_DIR),
                mount("l4mesh-podinfo", consts::PODINFO_DIR),
            ]
            .into_iter()
            .chain(api_token.then(|| mount(KUBE_API_ACCESS, SERVICE_ACCOUNT_DIR)))
            .collect(),
            restart_policy: opts.native_sidecar.then_some("Always"),
        }
    }
}

/// SPIRE's spiffe-helper as a native sidecar started before l4mesh: it writes the SVID,
/// key and bundle where l4mesh reads them and keeps them fresh. Its startup probe (the
/// helper's health endpoint) holds l4mesh back until the first certificate is written.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpiffeHelper {
    name: &'static str,
    image: String,
    args: [&'static str; 2],
    startup_probe: Probe,
    resources: Resources,
    security_context: SecurityContext,
    volume_mounts: [VolumeMount; 3],
    restart_policy: &'static str,
}

impl SpiffeHelper {
    fn new(image: &str) -> Self {
        SpiffeHelper {
            name: "spiffe-helper",
            image: image.to_string(),
            args: ["-config", "/etc/spiffe-helper/helper.conf"],
            startup_probe: Probe {
                http_get: HttpGet {
                    path: "/ready",
                    port: SPIFFE_HELPER_HEALTH_PORT,
                },
                period_seconds: 1,
                failure_threshold: 60,
            },
            resources: Resources {
                requests: Quantities::new(Some("5m"), "16Mi"),
                limits: Quantities::new(None, "64Mi"),
            },
            // The same user as l4mesh: the files it writes are the sidecar's to read.
            security_context: SecurityContext::proxy_user(),
            volume_mounts: [
                VolumeMount {
                    name: "spire-agent-socket",
                    mount_path: "/spiffe-workload-api",
                    read_only: true,
                },
                VolumeMount {
                    name: "l4mesh-certs",
                    mount_path: consts::CERTS_DIR,
                    read_only: false,
                },
                VolumeMount {
                    name: "l4mesh-spiffe-helper",
                    mount_path: "/etc/spiffe-helper",
                    read_only: true,
                },
            ],
            restart_policy: "Always",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_from: Option<EnvSource>,
}

impl EnvVar {
    fn value(name: &str, value: &str) -> Self {
        EnvVar {
            name: name.to_string(),
            value: Some(value.to_string()),
            value_from: None,
        }
    }

    /// From the downward API.
    fn field(name: &str, field_path: &'static str) -> Self {
        EnvVar {
            name: name.to_string(),
            value: None,
            value_from: Some(EnvSource {
                field_ref: FieldRef { field_path },
            }),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvSource {
    field_ref: FieldRef,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: &'static str,
    container_port: u16,
    protocol: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    http_get: HttpGet,
    period_seconds: u32,
    failure_threshold: u32,
}

#[derive(Serialize)]
struct HttpGet {
    path: &'static str,
    port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Lifecycle {
    #[serde(skip_serializing_if = "Option::is_none")]
    post_start: Option<Handler>,
    pre_stop: Handler,
}

#[derive(Serialize)]
struct Handler {
    exec: Exec,
}

#[derive(Serialize)]
struct Exec {
    command: Vec<&'static str>,
}

#[derive(Serialize)]
struct Resources {
    requests: Quantities,
    limits: Quantities,
}

#[derive(Serialize)]
struct Quantities {
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<&'static str>,
    memory: &'static str,
}

impl Quantities {
    fn new(cpu: Option<&'static str>, memory: &'static str) -> Self {
        Quantities { cpu, memory }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecurityContext {
    run_as_user: u32,
    run_as_group: u32,
    run_as_non_root: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    privileged: Option<bool>,
    allow_privilege_escalation: bool,
    read_only_root_filesystem: bool,
    capabilities: Capabilities,
}

impl SecurityContext {
    /// UID/GID 1337 (which the capture rules exempt), no capabilities, read-only root.
    fn proxy_user() -> Self {
        SecurityContext {
            run_as_user: consts::PROXY_UID,
            run_as_group: consts::PROXY_GID,
            run_as_non_root: true,
            privileged: None,
            allow_privilege_escalation: false,
            read_only_root_filesystem: true,
            capabilities: Capabilities {
                drop: ["ALL"],
                add: None,
            },
        }
    }
}

#[derive(Serialize)]
struct Capabilities {
    drop: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    add: Option<Vec<&'static str>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: &'static str,
    mount_path: &'static str,
    read_only: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<SecretSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config_map: Option<ConfigMapSource>,
    #[serde(rename = "downwardAPI", skip_serializing_if = "Option::is_none")]
    downward_api: Option<DownwardApiSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    csi: Option<CsiSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    projected: Option<ProjectedSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    empty_dir: Option<EmptyDirSource>,
}

impl Volume {
    fn empty(name: &'static str) -> Self {
        Volume {
            name,
            secret: None,
            config_map: None,
            downward_api: None,
            csi: None,
            projected: None,
            empty_dir: None,
        }
    }

    /// csi-driver-spiffe: files owned by the sidecar's group, so UID 1337 can read the key.
    fn csi_driver_spiffe() -> Self {
        Volume {
            csi: Some(CsiSource {
                driver: "spiffe.csi.cert-manager.io",
                read_only: true,
                volume_attributes: Some(
                    [(
                        "spiffe.csi.cert-manager.io/fs-group",
                        consts::PROXY_GID.to_string(),
                    )]
                    .into(),
                ),
            }),
            ..Volume::empty("l4mesh-certs")
        }
    }

    /// The Kubernetes API credentials the kubelet would mount, for the sidecar alone: given
    /// when the app opts out of its own (`automountServiceAccountToken: false`), so that the
    /// sidecar can still read Services and Pods (issue 24) while the app holds no token.
    fn kube_api_access() -> Self {
        Volume {
            projected: Some(ProjectedSource {
                sources: vec![
                    ProjectionSource {
                        service_account_token: Some(TokenProjection {
                            path: "token",
                            expiration_seconds: 3607,
                        }),
                        ..Default::default()
                    },
                    ProjectionSource {
                        config_map: Some(ConfigMapProjection {
                            name: "kube-root-ca.crt",
                            items: [KeyToPath {
                                key: "ca.crt",
                                path: "ca.crt",
                            }],
                        }),
                        ..Default::default()
                    },
                    ProjectionSource {
                        downward_api: Some(DownwardApiSource {
                            items: [DownwardApiItem {
                                path: "namespace",
                                field_ref: FieldRef {
                                    field_path: "metadata.namespace",
                                },
                            }],
                        }),
                        ..Default::default()
                    },
                ],
            }),
            ..Volume::empty(KUBE_API_ACCESS)
        }
    }

    /// A Pod Certificate (key and chain in one file) and the signer's trust bundle.
    fn pod_certificate(signer: &str, key_type: &str) -> Self {
        Volume {
            projected: Some(ProjectedSource {
                sources: vec![
                    ProjectionSource {
                        pod_certificate: Some(PodCertificateProjection {
                            signer_name: signer.to_string(),
                            key_type: key_type.to_string(),
                            credential_bundle_path: CREDENTIAL_BUNDLE,
                        }),
                        ..Default::default()
                    },
                    ProjectionSource {
                        // Every bundle the signer publishes (an empty selector matches all).
                        cluster_trust_bundle: Some(ClusterTrustBundleProjection {
                            signer_name: signer.to_string(),
                            label_selector: Mapping::new(),
                            path: "root-cert.pem",
                        }),
                        ..Default::default()
                    },
                ],
            }),
            ..Volume::empty("l4mesh-certs")
        }
    }

    /// SPIRE: a memory-backed folder spiffe-helper writes and l4mesh reads, the agent's
    /// Workload API socket (SPIFFE CSI driver), and spiffe-helper's config.
    fn spire() -> Vec<Self> {
        vec![
            Volume {
                empty_dir: Some(EmptyDirSource { medium: "Memory" }),
                ..Volume::empty("l4mesh-certs")
            },
            Volume {
                csi: Some(CsiSource {
                    driver: "csi.spiffe.io",
                    read_only: true,
                    volume_attributes: None,
                }),
                ..Volume::empty("spire-agent-socket")
            },
            Volume {
                config_map: Some(ConfigMapSource {
                    name: SPIFFE_HELPER_CONFIGMAP.to_string(),
                    optional: false,
                }),
                ..Volume::empty("l4mesh-spiffe-helper")
            },
        ]
    }

    /// The workload's certificate, under the file names the config expects.
    fn secret(secret_name: &str) -> Self {
        let item = |key, path| KeyToPath { key, path };
        Volume {
            secret: Some(SecretSource {
                secret_name: secret_name.to_string(),
                items: [
                    item("tls.crt", "cert-chain.pem"),
                    item("tls.key", "key.pem"),
                    item("ca.crt", "root-cert.pem"),
                ],
            }),
            ..Volume::empty("l4mesh-certs")
        }
    }

    /// The mesh's policy file; optional, so pods start before anyone writes a policy.
    fn config_map(name: &str) -> Self {
        Volume {
            config_map: Some(ConfigMapSource {
                name: name.to_string(),
                optional: true,
            }),
            ..Volume::empty("l4mesh-policy")
        }
    }

    /// The pod's labels, which PeerAuthentication selectors match.
    fn pod_labels() -> Self {
        Volume {
            downward_api: Some(DownwardApiSource {
                items: [DownwardApiItem {
                    path: "labels",
                    field_ref: FieldRef {
                        field_path: "metadata.labels",
                    },
                }],
            }),
            ..Volume::empty("l4mesh-podinfo")
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretSource {
    secret_name: String,
    items: [KeyToPath; 3],
}

#[derive(Serialize)]
struct KeyToPath {
    key: &'static str,
    path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CsiSource {
    driver: &'static str,
    read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_attributes: Option<std::collections::BTreeMap<&'static str, String>>,
}

#[derive(Serialize)]
struct ProjectedSource {
    sources: Vec<ProjectionSource>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct ProjectionSource {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_account_token: Option<TokenProjection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    config_map: Option<ConfigMapProjection>,
    #[serde(rename = "downwardAPI", skip_serializing_if = "Option::is_none")]
    downward_api: Option<DownwardApiSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_certificate: Option<PodCertificateProjection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_trust_bundle: Option<ClusterTrustBundleProjection>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodCertificateProjection {
    signer_name: String,
    key_type: String,
    credential_bundle_path: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterTrustBundleProjection {
    signer_name: String,
    label_selector: Mapping,
    path: &'static str,
}

#[derive(Serialize)]
struct EmptyDirSource {
    medium: &'static str,
}

#[derive(Serialize)]
struct ConfigMapSource {
    name: String,
    optional: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenProjection {
    path: &'static str,
    expiration_seconds: u32,
}

#[derive(Serialize)]
struct ConfigMapProjection {
    name: &'static str,
    items: [KeyToPath; 1],
}

#[derive(Serialize)]
struct DownwardApiSource {
    items: [DownwardApiItem; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DownwardApiItem {
    path: &'static str,
    field_ref: FieldRef,
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

    /// Capture annotations are read as `l4mesh iptables apply` reads them, here: spaces after
    /// commas (which its parser would refuse) are dropped, a bad value names its annotation.
    #[test]
    fn capture_annotations_are_checked_and_written_as_the_init_container_reads_them() {
        let pod = |annotations: &str| {
            format!("kind: Pod\nmetadata:\n  name: p\n  annotations: {{{annotations}}}\nspec: {{containers: [{{name: a, image: b}}]}}\n")
        };
        let out = inject_yaml(
            &pod("l4mesh.io/inbound-ports: '8080, 9090', l4mesh.io/exclude-outbound-ports: ' 5432 ,3306', l4mesh.io/exclude-outbound-cidrs: '10.0.0.0/8, fd00::/8'"),
            &Options::default(),
        )
        .unwrap();
        for want in [
            "value: 8080,9090",
            "value: 5432,3306",
            "value: 10.0.0.0/8,fd00::/8",
        ] {
            assert!(out.contains(want), "{want}: {out}");
        }
        let out = inject_yaml(&pod("l4mesh.io/inbound-ports: '*'"), &Options::default()).unwrap();
        assert!(out.contains("value: '*'"), "{out}");
        for (annotations, want) in [
            (
                "l4mesh.io/inbound-ports: ''",
                "l4mesh.io/inbound-ports: String(\"\"): expected",
            ),
            ("l4mesh.io/inbound-ports: '80,http'", "port \"http\""),
            (
                "l4mesh.io/exclude-inbound-ports: '65536'",
                "l4mesh.io/exclude-inbound-ports",
            ),
            (
                "l4mesh.io/exclude-outbound-cidrs: '10.0.0.1'",
                "write a network such as 10.0.0.0/8",
            ),
            ("l4mesh.io/exclude-outbound-ports: 22", "not a string"),
        ] {
            let err = inject_yaml(&pod(annotations), &Options::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{annotations}: {err}");
        }
    }

    /// `--trust-domain`, `--trust-domain-alias` and `--outbound-rules` reach the sidecar as
    /// the environment its Kubernetes defaults read (a SPIRE mesh is rarely `cluster.local`;
    /// Service ClusterIPs need a rule).
    #[test]
    fn mesh_wide_options_reach_the_sidecar() {
        let pod = "kind: Pod\nmetadata:\n  name: p\nspec: {containers: [{name: a, image: b}]}\n";
        let opts = Options {
            trust_domain: Some("example.org".into()),
            trust_domain_aliases: vec!["old.example".into(), "older.example".into()],
            outbound_rules: Some(
                "[{name: services, cidrs: [10.96.0.0/12], action: direct}]".into(),
            ),
            ..Options::default()
        };
        let out: Value = serde_yaml::from_str(&inject_yaml(pod, &opts).unwrap()).unwrap();
        let sidecar = out["spec"]["initContainers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "l4mesh")
            .unwrap();
        let env: std::collections::BTreeMap<String, String> = sidecar["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect();
        let mut config = crate::config::Config::parse(
            std::path::Path::new("defaults"),
            &crate::config::kubernetes_defaults(),
        )
        .unwrap();
        config.apply_env(|var| env.get(var).cloned()).unwrap();
        assert_eq!(
            config.identity.trust_domains().to_string(),
            "example.org (aliases old.example, older.example)"
        );
        assert_eq!(config.outbound.rules[0].name.as_deref(), Some("services"));
        // Without the options the sidecar keeps the default and no variable is set.
        let plain = inject_yaml(pod, &Options::default()).unwrap();
        assert!(!plain.contains(ENV_TRUST_DOMAIN), "{plain}");
    }

    #[test]
    fn certificate_source_annotations_are_checked() {
        let pod = |annotations: &str| {
            format!("kind: Pod\nmetadata:\n  name: p\n  annotations: {{{annotations}}}\nspec: {{containers: [{{name: a, image: b}}]}}\n")
        };
        let err = |annotations: &str, opts: &Options| {
            inject_yaml(&pod(annotations), opts)
                .unwrap_err()
                .to_string()
        };
        let native = Options::default();
        let classic = Options {
            native_sidecar: false,
            ..Options::default()
        };
        let cases = [
            (
                "l4mesh.io/cert-source: vault",
                &native,
                "\"vault\" is not one of secret, csi-driver-spiffe, pod-certificate, spire",
            ),
            (
                "l4mesh.io/cert-source: pod-certificate",
                &native,
                "pod-certificate needs l4mesh.io/cert-signer",
            ),
            (
                "l4mesh.io/cert-source: pod-certificate, l4mesh.io/cert-signer: x.io/y, l4mesh.io/cert-key-type: DSA",
                &native,
                "l4mesh.io/cert-key-type: \"DSA\" is not one of ECDSAP256",
            ),
            (
                "l4mesh.io/cert-source: spire",
                &classic,
                "spire needs native sidecars",
            ),
        ];
        for (annotations, opts, want) in cases {
            let e = err(annotations, opts);
            assert!(
                e.contains("document 1 (Pod)") && e.contains(want),
                "{annotations}: {e}"
            );
        }
        // The default is today's Secret, named after the service account or the annotation.
        let out = inject_yaml(&pod("l4mesh.io/cert-secret: mine"), &native).unwrap();
        assert!(out.contains("secretName: mine"), "{out}");
        // An explicit exclude list keeps its ports and gains spiffe-helper's health port.
        let out = inject_yaml(
            &pod("l4mesh.io/cert-source: spire, l4mesh.io/exclude-inbound-ports: '9000'"),
            &native,
        )
        .unwrap();
        assert!(out.contains("value: 9000,15029"), "{out}");
    }
}
