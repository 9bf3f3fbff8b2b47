//! Sidecar configuration: the YAML file `l4mesh run --config` reads, plus the environment
//! overrides Kubernetes injects. Parsed straight into typed fields, so a bad value is reported
//! with the file, line and field it came from, before anything starts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::consts;
use crate::identity::IdentityPattern;
use crate::identity::SpiffeId;
pub use crate::parse::PortRange;

/// The whole sidecar configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where each credential path was written (`identity.cert_chain` -> `sidecar.yaml:17`),
    /// so an unreadable file is reported with the line that named it. Not a config field.
    #[serde(skip)]
    pub origins: BTreeMap<&'static str, String>,
    /// Addresses the sidecar listens on.
    #[serde(default)]
    pub listeners: Listeners,
    /// This workload's certificate, key, trust bundle and trust domain.
    pub identity: IdentityConfig,
    /// Who this workload is; `POD_NAMESPACE`, `SERVICE_ACCOUNT`, `POD_NAME` and `POD_IP`
    /// override the file.
    #[serde(default)]
    pub workload: Workload,
    /// How captured outbound connections leave the pod.
    #[serde(default)]
    pub outbound: Outbound,
    /// Bounds on the slow steps of a connection.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Where the mTLS mode of each inbound port comes from.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// How inbound connections are told apart (mesh mTLS, foreign TLS, plaintext).
    #[serde(default)]
    pub detection: Detection,
    /// Metrics housekeeping.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// TLS between sidecars.
    #[serde(default)]
    pub tls: TlsSettings,
    /// Threads the sidecar runs on.
    #[serde(default)]
    pub runtime: Runtime,
    /// What the sidecar learns from the platform about the addresses its pod dials.
    #[serde(default)]
    pub discovery: Discovery,
}

/// The Kubernetes source (issue 24): Service ClusterIPs resolved to pods, who is meshed, which
/// identity each pod must present.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// `auto` (on when the sidecar runs in a pod with a service-account token, or when
    /// `kubeconfig` is set), `on` (a start without API configuration is an error), `off`.
    pub kubernetes: KubernetesMode,
    /// A kubeconfig to reach the API with, instead of the pod's own service account (tests,
    /// local runs). With `on` and neither, `KUBECONFIG` is read as every client reads it.
    pub kubeconfig: Option<PathBuf>,
    /// How long a connection to an address not seen before waits for the API's first
    /// answer; past it the connection is refused (never guessed).
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// A Service not used for this long is forgotten and its EndpointSlices no longer watched.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// This pod's node, for `internalTrafficPolicy: Local` (`NODE_NAME` overrides).
    pub node_name: Option<String>,
    /// How a ClusterIP first dialled is found to be a Service: `lookup` (asked for then, one
    /// API request before its EndpointSlices can be asked for; nothing cluster-wide held) or
    /// `watch_all` (every Service's ClusterIPs held from the start by one cluster-wide watch,
    /// so the first connection to a Service waits only for its EndpointSlices).
    pub services: ServiceLookup,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            kubernetes: KubernetesMode::Auto,
            kubeconfig: None,
            wait: Duration::from_secs(2),
            idle: Duration::from_secs(300),
            node_name: None,
            services: ServiceLookup::Lookup,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceLookup {
    Lookup,
    WatchAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// Where a pod's service-account token is mounted: its presence is what `auto` looks for.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// TLS between sidecars.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// TLS 1.3 session resumption between sidecars: a repeat connection to the same
    /// destination skips the signatures of a full handshake. Each resumed connection's peer
    /// certificate is still checked again (expiry, revocation, trust domain, pins).
    pub session_resumption: bool,
    /// Post-quantum hybrid key exchange (X25519MLKEM768) on the tunnel and the direct
    /// transport: `prefer` (offer it first, fall back to X25519), `require` (refuse peers
    /// without it), `off` (classical groups only).
    pub post_quantum: crate::tls::trust::PostQuantum,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            session_resumption: true,
            post_quantum: crate::tls::trust::PostQuantum::Prefer,
        }
    }
}

/// Threads the sidecar runs on.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Worker threads; unset means one per CPU the process may use.
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

/// Metrics housekeeping.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Istio TCP series of a peer with no open connection for this long are dropped, so the
    /// number of series stays bounded on a long-running sidecar.
    #[serde(with = "humantime_serde")]
    pub series_idle: Duration,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            series_idle: Duration::from_secs(600),
        }
    }
}

/// The policy file: Istio `PeerAuthentication` resources, watched and reloaded on change.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Multi-document YAML (e.g. a mounted ConfigMap); unset = no policies = PERMISSIVE.
    pub file: Option<PathBuf>,
    /// The namespace whose selector-less PeerAuthentication is mesh-wide.
    pub root_namespace: String,
    /// How often the file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A change is read once the file has not changed for this long: a write in several
    /// steps (`cmd > policy.yaml` truncates first) is never read half done.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// A missing file means "no policies yet" (an optional ConfigMap), not an error; it is
    /// picked up when it appears.
    pub optional: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: None,
            root_namespace: "istio-system".to_string(),
            reload_interval: Duration::from_millis(500),
            settle: default_settle(),
            optional: false,
        }
    }
}

/// Inbound protocol detection bounds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Detection {
    /// How long to wait for a client's first bytes before treating it as plaintext.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Ports where the server speaks first (MySQL, SMTP, ...): a plaintext client sends
    /// nothing, so detection gives up after `server_first_timeout` instead. Mesh clients always
    /// speak first, so they still get mTLS. Seeded with Linkerd's default opaque ports.
    pub server_first_ports: Vec<u16>,
    /// The detect timeout on server-first ports.
    #[serde(with = "humantime_serde")]
    pub server_first_timeout: Duration,
    /// Per-port detect timeouts, overriding both of the above.
    pub port_timeouts: BTreeMap<u16, humantime_serde::Serde<Duration>>,
    /// The most bytes buffered while deciding (a ClientHello larger than this is not ours).
    pub max_bytes: usize,
}

impl Default for Detection {
    fn default() -> Self {
        Detection {
            timeout: Duration::from_secs(5),
            server_first_ports: vec![21, 25, 110, 143, 587, 3306, 4444, 5432, 6379, 9300, 11211],
            server_first_timeout: Duration::from_millis(200),
            port_timeouts: BTreeMap::new(),
            max_bytes: 16 * 1024,
        }
    }
}

impl Detection {
    /// The detect timeout for an inbound port.
    pub fn timeout_for(&self, port: u16) -> Duration {
        if let Some(t) = self.port_timeouts.get(&port) {
            return **t;
        }
        if self.server_first_ports.contains(&port) {
            self.server_first_timeout
        } else {
            self.timeout
        }
    }
}

/// Listener addresses; defaults follow Istio's port numbers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// Where iptables redirects the pod's outbound connections.
    pub outbound: SocketAddr,
    /// Where iptables redirects connections to the pod.
    pub inbound: SocketAddr,
    /// The tunnel (HBONE) from other sidecars: never captured, answered directly.
    pub tunnel: SocketAddr,
    /// `/metrics`, `/healthz/ready`, `/plaintext_sources`, on the pod IP.
    pub metrics: SocketAddr,
    /// `/config_dump`, `POST /drain`, `/logging`: keep it on loopback.
    pub admin: SocketAddr,
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            outbound: SocketAddr::from(([0u16; 8], consts::OUTBOUND_PORT)),
            inbound: SocketAddr::from(([0u16; 8], consts::INBOUND_PORT)),
            tunnel: SocketAddr::from(([0u16; 8], consts::TUNNEL_PORT)),
            metrics: SocketAddr::from(([0u16; 8], consts::STATS_PORT)),
            admin: SocketAddr::from(([127, 0, 0, 1], consts::ADMIN_PORT)),
        }
    }
}

/// Where the workload's credentials live. Relative paths are relative to the config file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The mesh's trust domain; peers outside it are refused.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: TrustDomain,
    /// Other names of the trust domain (Istio's `trustDomainAliases`), for a migration from
    /// one to another: peers in them are accepted, and a policy principal naming any of them
    /// (or `cluster.local`) names the workload in all of them.
    #[serde(default)]
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// PEM: the workload certificate first, then any intermediates.
    pub cert_chain: PathBuf,
    /// PEM: the workload's private key (ECDSA P-256, Ed25519 or RSA; PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// PEM: one or more root certificates peers must chain to (several during a CA rollover).
    pub trust_bundle: PathBuf,
    /// PEM certificate revocation lists: peers (or intermediates) listed are refused.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// How often the files above are checked for a rotation.
    #[serde(default = "default_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A rotation is read once the files have not changed for this long. Off by default:
    /// a new set is checked whole before use (a half-copied one is refused and counted, the
    /// old one stays), and Kubernetes swaps the files at once; set it where a tool copies them
    /// one by one, to spare the failure counts.
    #[serde(default, with = "humantime_serde")]
    pub settle: Duration,
    /// Log a warning when the certificate has less than each of these left.
    #[serde(default = "default_expiry_warnings")]
    pub expiry_warnings: Vec<humantime_serde::Serde<Duration>>,
}

impl IdentityConfig {
    /// The trust domain with its aliases, as peers and policies are judged against them.
    pub fn trust_domains(&self) -> crate::identity::TrustDomains {
        let aliases: Vec<String> = self
            .trust_domain_aliases
            .iter()
            .map(|a| a.as_str().to_string())
            .collect();
        crate::identity::TrustDomains::new(self.trust_domain.as_str(), &aliases)
    }
}

fn default_reload() -> Duration {
    Duration::from_millis(500)
}

fn default_settle() -> Duration {
    Duration::from_secs(1)
}

fn default_expiry_warnings() -> Vec<humantime_serde::Serde<Duration>> {
    [6 * 3600, 3600, 600]
        .into_iter()
        .map(|s| Duration::from_secs(s).into())
        .collect()
}

fn default_trust_domain() -> TrustDomain {
    TrustDomain("cluster.local".to_string())
}

/// A SPIFFE trust domain name, e.g. `cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct TrustDomain(String);

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::parse::from_str(d, "a trust domain such as cluster.local", |s| {
            TrustDomain::try_from(s.to_string())
        })
    }
}

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match format!("spiffe://{s}").parse::<SpiffeId>() {
            Ok(id) if id.path().is_empty() => Ok(TrustDomain(s)),
            Ok(_) => Err(format!("invalid trust domain {s:?}: must not contain '/'")),
            Err(e) => Err(format!("invalid trust domain {s:?}: {e}")),
        }
    }
}

impl From<TrustDomain> for String {
    fn from(t: TrustDomain) -> String {
        t.0
    }
}

/// The workload this sidecar serves, as the Kubernetes downward API describes it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Kubernetes namespace; when set, the certificate's SPIFFE ID must carry it.
    pub namespace: Option<String>,
    /// Kubernetes service account; when set, the certificate's SPIFFE ID must carry it.
    pub service_account: Option<String>,
    /// Pod name, for logs.
    pub name: Option<String>,
    /// The workload (e.g. Deployment) name, as Istio's metrics label it; defaults to the
    /// `app` label, else `unknown`.
    pub workload_name: Option<String>,
    /// The ports the application serves. Per-port metrics name these (and ports with their
    /// own policy or detection setting) by number; any other port a client picks is `other`.
    pub ports: Vec<u16>,
    /// Pod IP.
    pub pod_ip: Option<IpAddr>,
    /// Pod labels; PeerAuthentication selectors match against them.
    pub labels: BTreeMap<String, String>,
    /// A Kubernetes downward-API labels file (`key="value"` lines); its labels override
    /// `labels`.
    pub labels_file: Option<PathBuf>,
}

/// Environment naming the credential files, over the config's `identity` paths.
pub const ENV_CERT_CHAIN: &str = "L4MESH_CERT_CHAIN";
pub const ENV_PRIVATE_KEY: &str = "L4MESH_PRIVATE_KEY";
pub const ENV_TRUST_BUNDLE: &str = "L4MESH_TRUST_BUNDLE";
/// Environment over `identity.trust_domain` and `identity.trust_domain_aliases` (a
/// comma-separated list): how `l4mesh inject --trust-domain` reaches a sidecar that runs on
/// the Kubernetes defaults.
pub const ENV_TRUST_DOMAIN: &str = "L4MESH_TRUST_DOMAIN";
pub const ENV_TRUST_DOMAIN_ALIASES: &str = "L4MESH_TRUST_DOMAIN_ALIASES";
/// Environment adding outbound rules (a YAML list, as `outbound.rules` takes it) before the
/// config's own: how `l4mesh inject --outbound-rules` gives every injected sidecar, say, a
/// rule for the cluster's Service CIDR.
pub const ENV_OUTBOUND_RULES: &str = "L4MESH_OUTBOUND_RULES";

/// Outbound rules as [`ENV_OUTBOUND_RULES`] and `inject --outbound-rules` take them: a YAML
/// (or JSON) list of `outbound.rules` entries; the error names the entry and field.
pub fn parse_outbound_rules(text: &str) -> Result<Vec<DestinationRule>, String> {
    serde_yaml::from_str(text).map_err(|e| {
        // serde_yaml names an entry `.[1].action`; say `rules[1].action`.
        let message = crate::parse::yaml_message(&e);
        let message = message.trim_start_matches('.');
        match message.starts_with('[') {
            true => format!("rules{message}"),
            false => format!("rules: {message}"),
        }
    })
}

/// Parses a downward-API labels file: one `key="value"` per line, values quoted Go-style.
pub fn parse_labels_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key=\"value\"", i + 1))?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .map(|v| v.replace("\\\"", "\"").replace("\\\\", "\\"))
            .unwrap_or_else(|| value.to_string());
        labels.insert(key.trim().to_string(), value);
    }
    Ok(labels)
}

/// Outbound routing: the first matching rule decides, else `default`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// What to do with a destination no rule matches.
    #[serde(default)]
    pub default: Action,
    /// Ordered destination rules.
    #[serde(default)]
    pub rules: Vec<DestinationRule>,
    /// With `auto`, how long a destination whose tunnel port refused is remembered as
    /// un-meshed (reached in plaintext without asking again).
    #[serde(default = "default_unmeshed_ttl", with = "humantime_serde")]
    pub unmeshed_ttl: Duration,
    /// With `auto`, how long a destination whose tunnel port answered is known to have a
    /// sidecar: a refusal within it (the sidecar restarting) fails the connection instead of
    /// sending it in plaintext. Renewed by every stream opened to it.
    #[serde(default = "default_sidecar_memory", with = "humantime_serde")]
    pub sidecar_memory: Duration,
    /// The tunnel connections kept to each destination.
    #[serde(default)]
    pub pool: Pool,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            default: Action::default(),
            rules: Vec::new(),
            unmeshed_ttl: default_unmeshed_ttl(),
            sidecar_memory: default_sidecar_memory(),
            pool: Pool::default(),
        }
    }
}

fn default_sidecar_memory() -> Duration {
    Duration::from_secs(600)
}

fn default_unmeshed_ttl() -> Duration {
    Duration::from_secs(30)
}

/// The pool of tunnel (HTTP/2 mTLS) connections to each destination sidecar.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Application connections (streams) one tunnel connection carries at once; more open
    /// another tunnel connection.
    pub max_streams: u32,
    /// A tunnel connection that has carried no stream for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Tunnel connections a busy destination's streams are spread over (a connection's
    /// framing and encryption run on one core at a time); unset: one per worker thread.
    /// `1` keeps every stream to a destination on one connection.
    pub spread: Option<std::num::NonZeroUsize>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            max_streams: 100,
            idle: Duration::from_secs(60),
            spread: None,
        }
    }
}

/// How a destination is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The tunnel when the destination has a sidecar; plaintext when its tunnel port refuses
    /// (no sidecar there: the destination is remembered as un-meshed for `unmeshed_ttl`);
    /// anything else (timeout, a certificate that does not verify) fails closed.
    #[default]
    Auto,
    /// The tunnel, always: never plaintext.
    Mtls,
    /// Mesh TLS straight to the destination port (ALPN `l4mesh/1`), for sidecars that
    /// predate the tunnel.
    Direct,
    /// Forward the bytes as they are (for destinations outside the mesh).
    Passthrough,
}

/// One destination rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "RawDestinationRule")]
pub struct DestinationRule {
    /// A name for logs; defaults to `rules[N]`.
    pub name: Option<String>,
    /// Destination networks; empty matches every address.
    pub cidrs: Vec<IpNet>,
    /// Destination ports or ranges; empty matches every port.
    pub ports: Vec<PortRange>,
    /// `auto`, `mtls`, `direct` or `passthrough`.
    pub action: Action,
    /// For `auto`, `mtls` and `direct`: the SPIFFE IDs (or `*`-patterns) the server may present; empty = any
    /// identity in the trust domain.
    pub server_identities: Vec<IdentityPattern>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestinationRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    cidrs: Vec<IpNet>,
    #[serde(default)]
    ports: Vec<PortRange>,
    action: Action,
    #[serde(default)]
    server_identities: Vec<IdentityPattern>,
}

impl TryFrom<RawDestinationRule> for DestinationRule {
    type Error = String;
    fn try_from(r: RawDestinationRule) -> Result<Self, String> {
        if r.action == Action::Passthrough && !r.server_identities.is_empty() {
            return Err(
                "server_identities: a `passthrough` rule cannot pin server identities".to_string(),
            );
        }
        Ok(DestinationRule {
            name: r.name,
            cidrs: r.cidrs,
            ports: r.ports,
            action: r.action,
            server_identities: r.server_identities,
        })
    }
}

impl DestinationRule {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        let ip = dst.ip().to_canonical();
        (self.cidrs.is_empty() || self.cidrs.iter().any(|net| net.contains(&ip)))
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dst.port())))
    }
}

/// Timeouts for the steps that wait on a peer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect to the destination or the application.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// A TLS handshake, either side.
    #[serde(with = "humantime_serde")]
    pub handshake: Duration,
    /// After SIGTERM or `POST /drain`, how long the listeners keep accepting while readiness
    /// is already false (Kubernetes takes a few seconds to stop routing to the pod).
    #[serde(with = "humantime_serde")]
    pub drain_accept: Duration,
    /// Then, how long connections in flight may finish.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Close an established connection that moves no byte either way for this long. Off by
    /// default: long-lived quiet connections (database pools, watches) are legitimate; set it
    /// where idle clients must not hold the application's connections forever.
    #[serde(with = "humantime_serde")]
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            drain_accept: Duration::from_secs(3),
            drain: Duration::from_secs(5),
            idle: None,
        }
    }
}

/// A configuration that cannot be used, said so that the fix is obvious.
#[derive(Debug, Error)]
pub enum ConfigError {
    // `error`, not `source`: the message already says it, and an error chain printed with
    // `{:#}` would say it twice.
    #[error("{path}: cannot read: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// The configuration an injected sidecar runs with when no `--config` is given: the files
/// where `l4mesh inject` mounts them.
pub fn kubernetes_defaults() -> String {
    format!(
        "identity:
  cert_chain: {certs}/cert-chain.pem
  private_key: {certs}/key.pem
  trust_bundle: {certs}/root-cert.pem
policy:
  file: {policy}/policy.yaml
  optional: true
workload:
  labels_file: {podinfo}/labels
",
        certs = consts::CERTS_DIR,
        policy = consts::POLICY_DIR,
        podinfo = consts::PODINFO_DIR,
    )
}

/// The lines that name the credential files: their keys are unique to the `identity` section.
fn credential_lines(path: &Path, text: &str) -> BTreeMap<&'static str, String> {
    use crate::identity::credentials::{CERT_CHAIN_FIELD, PRIVATE_KEY_FIELD, TRUST_BUNDLE_FIELD};
    let mut found = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        for field in [CERT_CHAIN_FIELD, PRIVATE_KEY_FIELD, TRUST_BUNDLE_FIELD] {
            // `identity.cert_chain` is written as `cert_chain:` under `identity:`.
            let key = field.trim_start_matches("identity.");
            let written = line.trim_start().strip_prefix(key);
            if written.is_some_and(|rest| rest.starts_with(':')) {
                found.insert(field, format!("{}:{}", path.display(), n + 1));
            }
        }
    }
    found
}

impl Config {
    /// The workload's namespace: configured, else the one in its SPIFFE ID.
    pub fn workload_namespace(&self, id: &SpiffeId) -> String {
        self.workload.namespace.clone().unwrap_or_else(|| {
            id.namespace_and_service_account()
                .map(|(ns, _)| ns.to_string())
                .unwrap_or_default()
        })
    }

    /// The Kubernetes defaults (see [`kubernetes_defaults`]) with the environment applied.
    pub fn kubernetes() -> Result<Config, ConfigError> {
        let mut config = Config::parse(
            Path::new("(built-in Kubernetes defaults)"),
            &kubernetes_defaults(),
        )?;
        config.apply_env(|var| std::env::var(var).ok())?;
        config.load_labels_file()?;
        Ok(config)
    }

    /// Reads `path`, resolves relative paths against its folder and applies the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config = Config::parse(path, &text)?;
        config.origins = credential_lines(path, &text);
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.apply_env(|var| std::env::var(var).ok())?;
        config.load_labels_file()?;
        Ok(config)
    }

    /// Parses YAML text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            // We lead with the position; the message does not say it again.
            let message = crate::parse::yaml_message(&e);
            if line == 0 {
                ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message,
                }
            } else {
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    line,
                    column,
                    message,
                }
            }
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let optional = [
            &mut self.policy.file,
            &mut self.workload.labels_file,
            &mut self.discovery.kubeconfig,
        ];
        let required = [
            &mut self.identity.cert_chain,
            &mut self.identity.private_key,
            &mut self.identity.trust_bundle,
        ];
        let crls = self.identity.crls.iter_mut();
        for p in required
            .into_iter()
            .chain(crls)
            .chain(optional.into_iter().flatten())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Reads `workload.labels_file`, if set, over `workload.labels`.
    pub fn load_labels_file(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.workload.labels_file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        let labels = parse_labels_file(&text).map_err(|message| ConfigError::Invalid {
            path: path.clone(),
            message,
        })?;
        self.workload.labels.extend(labels);
        Ok(())
    }

    /// Applies what Kubernetes injects through the downward API; `env` looks a variable up.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let nonempty = |var| env(var).filter(|v: &String| !v.is_empty());
        if let Some(ns) = nonempty("POD_NAMESPACE") {
            self.workload.namespace = Some(ns);
        }
        if let Some(sa) = nonempty("SERVICE_ACCOUNT") {
            self.workload.service_account = Some(sa);
        }
        if let Some(name) = nonempty("POD_NAME") {
            self.workload.name = Some(name);
        }
        if let Some(node) = nonempty("NODE_NAME") {
            self.discovery.node_name = Some(node);
        }
        if let Some(ip) = nonempty("POD_IP") {
            let parsed = ip
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Env {
                    var: "POD_IP",
                    value: ip.clone(),
                    reason: e.to_string(),
                })?;
            self.workload.pod_ip = Some(parsed);
        }
        // Where the certificate files are when a cert source puts them elsewhere (set by
        // `l4mesh inject`); one file may hold both key and chain.
        for (var, path) in [
            (ENV_CERT_CHAIN, &mut self.identity.cert_chain),
            (ENV_PRIVATE_KEY, &mut self.identity.private_key),
            (ENV_TRUST_BUNDLE, &mut self.identity.trust_bundle),
        ] {
            if let Some(p) = nonempty(var) {
                *path = PathBuf::from(p);
            }
        }
        let trust_domain = |var: &'static str, value: &str| {
            TrustDomain::try_from(value.trim().to_string()).map_err(|reason| ConfigError::Env {
                var,
                value: value.to_string(),
                reason,
            })
        };
        if let Some(td) = nonempty(ENV_TRUST_DOMAIN) {
            self.identity.trust_domain = trust_domain(ENV_TRUST_DOMAIN, &td)?;
        }
        if let Some(list) = nonempty(ENV_TRUST_DOMAIN_ALIASES) {
            self.identity.trust_domain_aliases = list
                .split(',')
                .filter(|a| !a.trim().is_empty())
                .map(|a| trust_domain(ENV_TRUST_DOMAIN_ALIASES, a))
                .collect::<Result<_, _>>()?;
        }
        if let Some(rules) = nonempty(ENV_OUTBOUND_RULES) {
            let mut added = parse_outbound_rules(&rules).map_err(|reason| ConfigError::Env {
                var: ENV_OUTBOUND_RULES,
                value: rules.clone(),
                reason,
            })?;
            // Before the config's own rules: the first match decides.
            added.append(&mut self.outbound.rules);
            self.outbound.rules = added;
        }
        // The app containers' declared ports, as the injector lists them: "8080,9090".
        if let Some(ports) = nonempty("L4MESH_APP_PORTS") {
            for port in ports.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let parsed =
                    port.parse()
                        .map_err(|e: std::num::ParseIntError| ConfigError::Env {
                            var: "L4MESH_APP_PORTS",
                            value: ports.clone(),
                            reason: format!("{port:?}: {e}"),
                        })?;
                if !self.workload.ports.contains(&parsed) {
                    self.workload.ports.push(parsed);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "identity:\n  cert_chain: c.pem\n  private_key: k.pem\n  trust_bundle: r.pem\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("sidecar.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_annotated_example_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sidecar.yaml"));
        let c = Config::parse(path, include_str!("../config/sidecar.yaml")).unwrap();
        assert_eq!(c.outbound.rules.len(), 2);
        assert_eq!(c.outbound.rules[1].server_identities.len(), 2);
        assert_eq!(c.workload.labels["app"], "cart");
        assert_eq!(c.listeners, Listeners::default());
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
        assert_eq!(c.detection.timeout_for(8025), Duration::from_millis(100));
        assert_eq!(c.policy.file.as_deref(), Some(Path::new("policy.yaml")));
    }

    /// `discovery.services` takes its two values; anything else names the file, line and field.
    #[test]
    fn discovery_services_is_lookup_or_watch_all() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.discovery.services, ServiceLookup::Lookup);
        let c = parse(&format!("{MINIMAL}discovery:\n  services: watch_all\n")).unwrap();
        assert_eq!(c.discovery.services, ServiceLookup::WatchAll);
        let e = parse(&format!("{MINIMAL}discovery:\n  services: everything\n")).unwrap_err();
        assert!(
            e.starts_with("sidecar.yaml:6:") && e.contains("services") && e.contains("watch_all"),
            "{e}"
        );
    }

    /// Every demo and test used to start with "certificate expires soon": the first warning
    /// must come after a fresh dev certificate would have been renewed.
    #[test]
    fn a_fresh_dev_certificate_is_not_about_to_expire() {
        let c = parse(MINIMAL).unwrap();
        let first = c
            .identity
            .expiry_warnings
            .iter()
            .map(|d| **d)
            .max()
            .unwrap();
        assert!(first < consts::DEV_CERT_TTL / 3, "first warning {first:?}");
    }

    /// config/sidecar.yaml says it shows every field: each field of `Config` (as it
    /// serializes) must be written in it.
    #[test]
    fn the_example_config_shows_every_field() {
        fn keys(v: &serde_yaml::Value, at: &str, out: &mut std::collections::BTreeSet<String>) {
            match v {
                serde_yaml::Value::Mapping(m) => {
                    for (k, v) in m {
                        let path = format!("{at}.{}", k.as_str().unwrap_or("?"));
                        out.insert(path.clone());
                        keys(v, &path, out);
                    }
                }
                serde_yaml::Value::Sequence(items) => {
                    for v in items {
                        keys(v, &format!("{at}[]"), out);
                    }
                }
                _ => {}
            }
        }
        let text = include_str!("../config/sidecar.yaml");
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sidecar.yaml"));
        let config = Config::parse(path, text).unwrap();
        let (mut written, mut fields) = Default::default();
        keys(&serde_yaml::from_str(text).unwrap(), "", &mut written);
        keys(&serde_yaml::to_value(&config).unwrap(), "", &mut fields);
        let missing: Vec<_> = fields.difference(&written).collect();
        assert!(missing.is_empty(), "config/sidecar.yaml lacks {missing:?}");
    }

    #[test]
    fn minimal_config_gets_istio_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners.outbound.port(), 15001);
        assert_eq!(c.listeners.inbound.port(), 15006);
        assert_eq!(c.listeners.metrics.port(), 15020);
        assert_eq!(c.listeners.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.identity.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.listeners.tunnel.port(), 15008);
        assert_eq!(c.outbound.default, Action::Auto);
        assert_eq!(c.outbound.unmeshed_ttl, Duration::from_secs(30));
        assert_eq!(c.outbound.sidecar_memory, Duration::from_secs(600));
        assert_eq!(c.timeouts.handshake, Duration::from_secs(10));
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let err = parse(&format!("{MINIMAL}outbund:\n  default: mtls\n")).unwrap_err();
        assert!(err.starts_with("sidecar.yaml:5:"), "{err}");
        assert!(err.contains("unknown field `outbund`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("listeners:\n  inbound: nope\n", "sidecar.yaml:6:", "listeners.inbound"),
            (
                "outbound:\n  rules:\n    - cidrs: [10.0.0.0/33]\n      action: mtls\n",
                "sidecar.yaml:7:",
                "outbound.rules[0]",
            ),
            (
                "outbound:\n  rules:\n    - ports: [\"90-80\"]\n      action: mtls\n",
                "sidecar.yaml:",
                "90 > 80",
            ),
            (
                "outbound:\n  rules:\n    - action: hbone\n",
                "sidecar.yaml:7:",
                "unknown variant `hbone`",
            ),
            (
                "outbound:\n  rules:\n    - action: passthrough\n      server_identities: [\"spiffe://td/x\"]\n",
                "sidecar.yaml:",
                "a `passthrough` rule cannot pin",
            ),
            ("timeouts:\n  handshake: soon\n", "sidecar.yaml:6:", "timeouts.handshake"),
        ];
        for (extra, at, what) in cases {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(err.starts_with(at), "{extra}: {err}");
            assert!(err.contains(what), "{extra}: {err}");
        }
    }

    #[test]
    fn missing_identity_is_named() {
        let err = parse("listeners: {}\n").unwrap_err();
        assert!(err.contains("missing field `identity`"), "{err}");
    }

    #[test]
    fn bad_trust_domain_is_refused() {
        let err = parse(&format!("{MINIMAL}  trust_domain: Bad/Domain\n")).unwrap_err();
        assert!(
            err.starts_with("sidecar.yaml:5:17: identity.trust_domain"),
            "{err}"
        );
        assert!(err.contains("invalid trust domain"), "{err}");
        // An alias is checked the same way, and named by its place in the list.
        let err = parse(&format!(
            "{MINIMAL}  trust_domain_aliases: [old.example, Bad/Domain]\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("sidecar.yaml:5:39: identity.trust_domain_aliases[1]"),
            "{err}"
        );
        let c = parse(&format!(
            "{MINIMAL}  trust_domain: new.example\n  trust_domain_aliases: [old.example, new.example]\n"
        ))
        .unwrap();
        assert_eq!(
            c.identity.trust_domains().to_string(),
            "new.example (aliases old.example)"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = parse(&format!("{MINIMAL}workload:\n  namespace: file\n")).unwrap();
        c.apply_env(|v| match v {
            "POD_NAMESPACE" => Some("shop".into()),
            "SERVICE_ACCOUNT" => Some("cart".into()),
            "POD_IP" => Some("10.1.2.3".into()),
            "L4MESH_APP_PORTS" => Some("8080, 9090".into()),
            // What `l4mesh inject` sets for a Pod Certificate: key and chain in one file.
            "L4MESH_CERT_CHAIN" | "L4MESH_PRIVATE_KEY" => Some("/certs/bundle.pem".into()),
            "L4MESH_TRUST_BUNDLE" => Some("/certs/root-cert.pem".into()),
            // What `l4mesh inject --trust-domain ... --trust-domain-alias ...` sets.
            "L4MESH_TRUST_DOMAIN" => Some("new.example".into()),
            "L4MESH_TRUST_DOMAIN_ALIASES" => Some("old.example, cluster.local".into()),
            "L4MESH_OUTBOUND_RULES" => {
                Some("[{name: services, cidrs: [10.96.0.0/12], action: direct}]".into())
            }
            _ => None,
        })
        .unwrap();
        let rule = &c.outbound.rules[0];
        assert_eq!(rule.name.as_deref(), Some("services"));
        assert_eq!(rule.action, Action::Direct);
        assert!(rule.matches("10.100.0.1:80".parse().unwrap()));
        assert_eq!(
            c.identity.trust_domains().to_string(),
            "new.example (aliases old.example, cluster.local)"
        );
        assert_eq!(c.identity.cert_chain, Path::new("/certs/bundle.pem"));
        assert_eq!(c.identity.private_key, Path::new("/certs/bundle.pem"));
        assert_eq!(c.identity.trust_bundle, Path::new("/certs/root-cert.pem"));
        assert_eq!(c.workload.ports, vec![8080, 9090]);
        assert_eq!(c.workload.namespace.as_deref(), Some("shop"));
        assert_eq!(c.workload.service_account.as_deref(), Some("cart"));
        assert_eq!(c.workload.pod_ip, Some("10.1.2.3".parse().unwrap()));
        let err = c
            .apply_env(|v| (v == "POD_IP").then(|| "10.1.2".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("POD_IP=\"10.1.2\""), "{err}");
        let err = c
            .apply_env(|v| (v == "L4MESH_APP_PORTS").then(|| "8080,http".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("L4MESH_APP_PORTS"), "{err}");
        let err = c
            .apply_env(|v| (v == "L4MESH_TRUST_DOMAIN_ALIASES").then(|| "ok.example,Bad/TD".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("L4MESH_TRUST_DOMAIN_ALIASES")
                && err.contains("invalid trust domain \"Bad/TD\""),
            "{err}"
        );
        let err = c
            .apply_env(|v| {
                (v == "L4MESH_OUTBOUND_RULES")
                    .then(|| "[{cidrs: [10.96.0.0/12], action: direct}, {action: tunnel}]".into())
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("L4MESH_OUTBOUND_RULES")
                && err.contains("rules[1].action: unknown variant `tunnel`"),
            "{err}"
        );
    }

    #[test]
    fn detection_timeouts_per_port() {
        let c = parse(&format!(
            "{MINIMAL}detection:\n  timeout: 3s\n  server_first_timeout: 50ms\n  port_timeouts:\n    3306: 1s\n"
        ))
        .unwrap();
        assert_eq!(c.detection.timeout_for(8080), Duration::from_secs(3));
        assert_eq!(c.detection.timeout_for(25), Duration::from_millis(50));
        assert_eq!(c.detection.timeout_for(3306), Duration::from_secs(1));
        assert_eq!(c.policy.root_namespace, "istio-system");
        // Client-silent protocols on their usual ports wait briefly by default: FTP, POP3,
        // IMAP, SMTP (an FTP banner on an unlisted port waited the full 5 s).
        let d = Detection::default();
        for port in [21, 25, 110, 143, 587, 3306] {
            assert_eq!(d.timeout_for(port), d.server_first_timeout, "{port}");
        }
    }

    #[test]
    fn downward_api_labels_file() {
        let labels =
            parse_labels_file("app=\"cart\"\nversion=\"v1\"\nquote=\"a\\\"b\"\n\n").unwrap();
        assert_eq!(labels["app"], "cart");
        assert_eq!(labels["version"], "v1");
        assert_eq!(labels["quote"], "a\"b");
        assert!(parse_labels_file("novalue\n")
            .unwrap_err()
            .contains("line 1"));
    }

    #[test]
    fn rules_match_cidr_and_port() {
        let c = parse(&format!(
            "{MINIMAL}outbound:\n  rules:\n    - cidrs: [10.0.0.0/8, \"fd00::/8\"]\n      ports: [80, \"8000-8100\"]\n      action: passthrough\n"
        ))
        .unwrap();
        let r = &c.outbound.rules[0];
        assert!(r.matches("10.1.1.1:80".parse().unwrap()));
        assert!(r.matches("10.1.1.1:8050".parse().unwrap()));
        assert!(r.matches("[::ffff:10.1.1.1]:80".parse().unwrap()));
        assert!(r.matches("[fd00::1]:8100".parse().unwrap()));
        assert!(!r.matches("10.1.1.1:81".parse().unwrap()));
        assert!(!r.matches("11.1.1.1:80".parse().unwrap()));
    }
}
