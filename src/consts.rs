//! The numbers and paths every part of l4mesh must agree on, written once: the capture rules,
//! the listeners' defaults, the injected pod spec and the Kubernetes default config all read
//! them from here. Port numbers and the UID are Istio's, which users already know.

/// Where iptables redirects the pod's outbound TCP.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where iptables redirects TCP addressed to the pod.
pub const INBOUND_PORT: u16 = 15006;
/// The tunnel (HBONE): mTLS, ALPN h2, one HTTP/2 CONNECT stream per connection. Never
/// captured; a pod without a sidecar refuses it, which is how `auto` tells meshed pods apart.
pub const TUNNEL_PORT: u16 = 15008;
/// Metrics and readiness, on the pod IP (Prometheus, the kubelet).
pub const STATS_PORT: u16 = 15020;
/// Admin endpoints, loopback only.
pub const ADMIN_PORT: u16 = 15000;
/// Istio's health port: never captured, so a pod moving between meshes keeps its probes.
pub const HEALTH_PORT: u16 = 15021;
/// The sidecar's UID and GID: its own sockets are never captured.
pub const PROXY_UID: u32 = 1337;
pub const PROXY_GID: u32 = 1337;

/// Where the injector mounts the workload's certificate Secret.
pub const CERTS_DIR: &str = "/var/run/secrets/l4mesh";
/// Where the injector mounts the policy ConfigMap.
pub const POLICY_DIR: &str = "/etc/l4mesh/policy";
/// Where the injector mounts the pod's labels (downward API).
pub const PODINFO_DIR: &str = "/etc/l4mesh/podinfo";

/// How long `l4mesh certs issue` certificates live unless told otherwise: a day, as Istio's
/// workload certificates. The first default expiry warning comes well after a renewal at two
/// thirds of that would have happened.
pub const DEV_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
