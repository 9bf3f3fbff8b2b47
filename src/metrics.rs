//! Metrics: every counter l4mesh keeps, registered on a registry the app owns (no globals, so
//! two apps in one test process do not collide). Passed around as `Arc<Metrics>`; the stages
//! of a connection record into it. Label values come from config and detection results, never
//! from client addresses, so the number of series stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Names `migration-report` reads back from a scrape or from Prometheus: written once, here.
pub const INBOUND_DETECTIONS: &str = "l4mesh_inbound_detections_total";
pub const WORKLOAD_INFO: &str = "l4mesh_workload_info";
/// Istio's count of opened connections: by peer principal, per reporter.
pub const TCP_OPENED: &str = "istio_tcp_connections_opened_total";
/// The detection `outcome` of a connection STRICT refused (the others are
/// `sniff::Protocol` names).
pub const REFUSED_STRICT: &str = "refused_strict";
/// The `port` label of every port nobody configured (see `ProxyInputs::port_label`).
pub const OTHER_PORT: &str = "other";

/// Istio's standard TCP metric labels, in the order values are given.
pub const TCP_LABELS: [&str; 17] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Who a proxied connection was between, as Istio's TCP metrics label it. Values Istio cannot
/// know are `unknown`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionLabels {
    /// `destination` (inbound side) or `source` (outbound side).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    /// `<name>.<namespace>.svc.cluster.local` of the Service the connection came through,
    /// and its two parts; only ever what the Kubernetes API said.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: &'static str,
}

impl ConnectionLabels {
    /// Fills the three destination-service labels from a Service's full name
    /// (`<name>.<namespace>.svc.<domain>`).
    pub fn through_service(&mut self, fqdn: &str) {
        let mut parts = fqdn.splitn(3, '.');
        if let (Some(name), Some(namespace)) = (parts.next(), parts.next()) {
            self.destination_service_name = name.to_string();
            self.destination_service_namespace = namespace.to_string();
            self.destination_service = fqdn.to_string();
        }
    }

    /// Every party `unknown` (what Istio says of what it cannot know), no mTLS.
    pub fn unknown(reporter: &'static str) -> ConnectionLabels {
        let unknown = || "unknown".to_string();
        ConnectionLabels {
            reporter,
            source_workload: unknown(),
            source_workload_namespace: unknown(),
            source_principal: unknown(),
            source_app: unknown(),
            source_version: unknown(),
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
            destination_app: unknown(),
            destination_version: unknown(),
            destination_service: unknown(),
            destination_service_name: unknown(),
            destination_service_namespace: unknown(),
            connection_security_policy: "none",
        }
    }

    fn values(&self) -> [&str; 17] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            "tcp",
            "-",
            self.connection_security_policy,
        ]
    }
}

/// One proxied connection's counters: `opened` counted when made, `closed` when dropped;
/// the byte counters are handed to the relay, which adds to them as bytes move, so a
/// long-lived connection shows up in `rate()` while it is open. The counters are shared with
/// every other connection of the same label set: a connection holds pointers, not labels.
pub struct ConnectionRecorder {
    /// Request direction (client to server): Istio's `received` bytes.
    pub received: IntCounter,
    /// Response direction (server to client): Istio's `sent` bytes.
    pub sent: IntCounter,
    closed: IntCounter,
    active: IntGauge,
    series: Option<Arc<Series>>,
}

impl ConnectionRecorder {
    /// Counters registered nowhere, for relays nobody measures (unit tests).
    pub fn detached() -> ConnectionRecorder {
        let c = |n: &str| IntCounter::new(n, n).expect("static metric name");
        ConnectionRecorder {
            received: c("received"),
            sent: c("sent"),
            closed: c("closed"),
            active: IntGauge::new("active", "active").expect("static metric name"),
            series: None,
        }
    }
}

impl Drop for ConnectionRecorder {
    fn drop(&mut self) {
        self.closed.inc();
        self.active.dec();
        if let Some(series) = &self.series {
            series.open.fetch_sub(1, Ordering::AcqRel);
            series.touch();
        }
    }
}

/// The series of each label set, with its book-keeping, shared by its connections.
type SeriesBook = Mutex<HashMap<ConnectionLabels, Arc<Series>>>;

/// One label set's Istio TCP counters (looked up once, when the set first appears) and what
/// `sweep_idle` needs: how many connections use it and when one last opened or closed.
struct Series {
    opened: IntCounter,
    closed: IntCounter,
    sent: IntCounter,
    received: IntCounter,
    active: IntGauge,
    open: AtomicUsize,
    /// Milliseconds since `epoch`.
    last_used: AtomicU64,
    epoch: Instant,
}

impl Series {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_used.store(now, Ordering::Release);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// The l4mesh counters.
pub struct Metrics {
    pub registry: Registry,
    /// Inbound detection decisions by destination port and outcome (`mtls`, `plaintext`,
    /// `foreign_tls`, `timeout`, or `refused_strict` when STRICT refused the connection).
    pub inbound_detections: IntCounterVec,
    /// STRICT refusals by destination port and what the client spoke.
    pub strict_refusals: IntCounterVec,
    /// Every connection once it ends, by direction and outcome: `completed`, or the error
    /// that ended it (`not_pod_address`, `strict`, `handshake`, `connect_app`, ...). One
    /// series per outcome; see `proxy::Ending`.
    pub connections_ended: IntCounterVec,
    /// Outbound connections sent in plaintext, by reason: `rule` (a passthrough rule) or
    /// `unmeshed` (`auto`: the destination's tunnel port refused, it has no sidecar).
    pub outbound_plaintext: IntCounterVec,
    /// Connections to the stats or admin listener closed because it was serving its maximum
    /// and a newer one arrived, by listener (`stats`, `admin`).
    pub admin_evictions: IntCounterVec,
    /// Policy file reloads by result (`success`, `failure`, `missing`: the file is gone).
    pub policy_reloads: IntCounterVec,
    /// Certificate rotations by result (`success`, `failure`, `missing`).
    pub certificate_reloads: IntCounterVec,
    /// Authorization decisions by deciding policy (`ns/name`) and action (`allow`, `deny`,
    /// `audit`).
    pub authorization_decisions: IntCounterVec,
    /// What dry-run AuthorizationPolicies (`istio.io/dry-run: "true"`) would have decided,
    /// by policy and decision (`allow`, `deny`, `audit`): never enforced.
    pub authz_dry_run: IntCounterVec,
    /// Failed mTLS handshakes by direction (`inbound`, `outbound`) and reason (`unknown_ca`,
    /// `expired`, `bad_identity`, `timeout`, `protocol`, ...; see `tls::HandshakeError`).
    pub handshake_failures: IntCounterVec,
    /// Successful mTLS handshake durations by direction.
    pub handshake_duration: HistogramVec,
    /// Successful mTLS handshakes by direction and kind (`full`, or `resumed` from a session
    /// ticket: no signatures, the peer's certificate checked again).
    pub handshakes: IntCounterVec,
    /// Successful mTLS handshakes by direction and key-exchange group (`X25519MLKEM768`,
    /// `X25519`, ...): how much of the mesh's traffic is protected against a quantum computer.
    pub key_exchanges: IntCounterVec,
    /// Connections being proxied now, by direction and security (`mutual_tls`, `none`).
    pub active_connections: IntGaugeVec,
    /// This workload's certificate's notAfter, as a Unix timestamp.
    pub certificate_expiry: IntGauge,
    /// What the allocator holds, read at each scrape: `in_use` by the program, `free` kept
    /// for reuse. RSS alone cannot tell a leak (in use grows) from fragmentation (free grows).
    heap: IntGaugeVec,
    /// Istio's standard TCP metrics.
    pub tcp_opened: IntCounterVec,
    pub tcp_closed: IntCounterVec,
    pub tcp_sent_bytes: IntCounterVec,
    pub tcp_received_bytes: IntCounterVec,
    series: SeriesBook,
    /// Where `Series::last_used` counts from.
    epoch: Instant,
    /// `1`, labelled with who this sidecar is, so reports and dashboards can name it.
    pub workload_info: IntGaugeVec,
    /// Recent sources of non-mTLS inbound connections, per port (bounded; not a metric,
    /// because addresses must never become label values).
    pub plaintext_sources: PlaintextSources,
    /// The last refused or failed connections, for the admin "why refused" view.
    pub refusals: Refusals,
    /// Recent destinations this workload reached in plaintext because they have no sidecar
    /// (`auto`), per destination port: the other half of a migration.
    pub unmeshed_destinations: PlaintextSources,
}

/// How many ports, and sources per port, `PlaintextSources` remembers.
const MAX_PORTS: usize = 64;
const MAX_SOURCES_PER_PORT: usize = 32;

/// Who is still talking to this workload without mTLS: the last few source addresses per port
/// with counts, for `l4mesh migration-report`. Bounded: when full, the least recently seen
/// entry is replaced.
#[derive(Default)]
pub struct PlaintextSources {
    ports: Mutex<HashMap<u16, Vec<SourceSeen>>>,
}

/// One source address seen on a port.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SourceSeen {
    pub address: std::net::IpAddr,
    pub connections: u64,
    /// Seconds since the Unix epoch.
    pub last_seen: u64,
    /// `plaintext`, `foreign_tls` or `timeout`.
    pub protocol: &'static str,
    /// The Kubernetes Service it was reached through (outbound, with the Kubernetes source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl PlaintextSources {
    pub fn record(&self, port: u16, address: std::net::IpAddr, protocol: &'static str) {
        self.record_via(port, address, protocol, None)
    }

    /// `record`, naming the Service the address was reached through.
    pub fn record_via(
        &self,
        port: u16,
        address: std::net::IpAddr,
        protocol: &'static str,
        service: Option<&str>,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Ok(mut ports) = self.ports.lock() else {
            return;
        };
        if !ports.contains_key(&port) && ports.len() >= MAX_PORTS {
            return;
        }
        let seen = ports.entry(port).or_default();
        if let Some(s) = seen.iter_mut().find(|s| s.address == address) {
            s.connections += 1;
            s.last_seen = now;
            s.protocol = protocol;
            if let Some(service) = service {
                s.service = Some(service.to_string());
            }
            return;
        }
        let entry = SourceSeen {
            address,
            connections: 1,
            last_seen: now,
            protocol,
            service: service.map(str::to_string),
        };
        if seen.len() < MAX_SOURCES_PER_PORT {
            seen.push(entry);
        } else if let Some(oldest) = seen.iter_mut().min_by_key(|s| s.last_seen) {
            *oldest = entry;
        }
    }

    /// Everything remembered, as JSON: `{"8080": [{"address": ..., ...}], ...}`.
    pub fn to_json(&self) -> String {
        let ports = match self.ports.lock() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let map: std::collections::BTreeMap<String, Vec<SourceSeen>> =
            ports.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::to_string_pretty(&map).unwrap_or_else(|_| "{}".to_string())
    }
}

/// The last [`MAX_REFUSALS`] refused or failed connections (admin `/refused`): when, from
/// where, to which port, who the peer was, how it ended and which policy decided. Bounded in
/// count and in the size of every field a peer can influence.
#[derive(Default)]
pub struct Refusals {
    entries: Mutex<std::collections::VecDeque<Refusal>>,
}

pub const MAX_REFUSALS: usize = 100;

/// The port, peer identity and deciding policy of a refused connection, as far as known
/// (what an ending adds to its outcome; see `proxy::Ending::context`).
#[derive(Clone, Debug, Default)]
pub struct RefusalContext {
    pub port: Option<u16>,
    pub peer: Option<String>,
    pub policy: Option<String>,
}
/// Longer texts are cut: a hostile peer's CONNECT target or certificate must not make an
/// entry large.
const MAX_REFUSAL_TEXT: usize = 300;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Refusal {
    /// RFC 3339, to the millisecond.
    pub time: String,
    pub direction: &'static str,
    pub source: std::net::SocketAddr,
    pub port: Option<u16>,
    /// The peer's identity (a SPIFFE ID without the scheme), when it got that far.
    pub peer: Option<String>,
    /// The `outcome` label of `l4mesh_connections_total`.
    pub outcome: &'static str,
    /// The deciding policy (AuthorizationPolicy and rule, or PeerAuthentication and level).
    pub policy: Option<String>,
    pub error: String,
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_REFUSAL_TEXT {
        let mut end = MAX_REFUSAL_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Refusals {
    pub fn record(
        &self,
        direction: &'static str,
        source: std::net::SocketAddr,
        outcome: &'static str,
        context: RefusalContext,
        error: &dyn std::fmt::Display,
    ) {
        let entry = Refusal {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            direction,
            source,
            port: context.port,
            peer: context.peer.map(cut),
            outcome,
            policy: context.policy.map(cut),
            error: cut(error.to_string()),
        };
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_REFUSALS {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Newest first, as JSON.
    pub fn to_json(&self) -> String {
        let entries: Vec<Refusal> = match self.entries.lock() {
            Ok(e) => e.iter().rev().cloned().collect(),
            Err(e) => e.into_inner().iter().rev().cloned().collect(),
        };
        serde_json::to_string_pretty(&entries).unwrap_or_else(|_| "[]".to_string())
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric names and labels are static and valid");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric is registered once on a fresh registry");
            c
        };
        Metrics {
            outbound_plaintext: counter(
                "l4mesh_outbound_plaintext_total",
                "Outbound connections sent without mTLS, by reason (rule: a passthrough rule; unmeshed: auto found no sidecar at the destination)",
                &["reason"],
            ),
            inbound_detections: counter(
                INBOUND_DETECTIONS,
                "Inbound connections by what their first bytes were and what was done",
                &["port", "outcome"],
            ),
            strict_refusals: counter(
                "l4mesh_strict_refusals_total",
                "Inbound connections refused because the port is STRICT and the client did not speak mesh mTLS",
                &["port", "protocol"],
            ),
            connections_ended: counter(
                "l4mesh_connections_total",
                "Connections by direction and how they ended (completed, or the error that ended them)",
                &["direction", "outcome"],
            ),
            admin_evictions: counter(
                "l4mesh_admin_connections_evicted_total",
                "Stats or admin connections closed to make room for a newer one, by listener",
                &["listener"],
            ),
            policy_reloads: counter(
                "l4mesh_policy_reloads_total",
                "Policy file reloads by result (success, failure, missing); unless success, the policy in force stays",
                &["result"],
            ),
            certificate_reloads: counter(
                "l4mesh_certificate_reloads_total",
                "Certificate rotations by result (success, failure, missing, unchanged: files touched, contents the same); unless success, the credentials in force stay",
                &["result"],
            ),
            authorization_decisions: counter(
                "l4mesh_authorization_decisions_total",
                "Inbound authorization decisions by deciding AuthorizationPolicy and action",
                &["policy", "action"],
            ),
            authz_dry_run: counter(
                "l4mesh_authz_dry_run_total",
                "What dry-run AuthorizationPolicies would have decided (never enforced), by policy and decision",
                &["policy", "decision"],
            ),
            handshake_failures: counter(
                "l4mesh_tls_handshake_failures_total",
                "Failed mTLS handshakes by direction and reason",
                &["direction", "reason"],
            ),
            key_exchanges: counter(
                "l4mesh_tls_key_exchanges_total",
                "Successful mTLS handshakes by direction and negotiated key-exchange group",
                &["direction", "group"],
            ),
            handshakes: counter(
                "l4mesh_tls_handshakes_total",
                "Successful mTLS handshakes by direction and kind (full, resumed)",
                &["direction", "kind"],
            ),
            handshake_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "l4mesh_tls_handshake_duration_seconds",
                        "Successful mTLS handshake durations by direction",
                    )
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                    &["direction"],
                )
                .expect("static histogram");
                registry
                    .register(Box::new(h.clone()))
                    .expect("registered once");
                h
            },
            active_connections: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "l4mesh_active_connections",
                        "Connections being proxied now by direction and security",
                    ),
                    &["direction", "security"],
                )
                .expect("static gauge");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            certificate_expiry: {
                let g = IntGauge::new(
                    "l4mesh_certificate_expiry_timestamp_seconds",
                    "notAfter of this workload's certificate, Unix time",
                )
                .expect("static gauge");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            heap: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "l4mesh_heap_bytes",
                        "Heap bytes the allocator holds: in_use by the program, free for reuse",
                    ),
                    &["state"],
                )
                .expect("static gauge");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            tcp_opened: counter(
                TCP_OPENED,
                "TCP connections opened (Istio standard metric)",
                &TCP_LABELS,
            ),
            tcp_closed: counter(
                "istio_tcp_connections_closed_total",
                "TCP connections closed (Istio standard metric)",
                &TCP_LABELS,
            ),
            tcp_sent_bytes: counter(
                "istio_tcp_sent_bytes_total",
                "Bytes sent in the response direction, server to client (Istio standard metric)",
                &TCP_LABELS,
            ),
            tcp_received_bytes: counter(
                "istio_tcp_received_bytes_total",
                "Bytes received in the request direction, client to server (Istio standard metric)",
                &TCP_LABELS,
            ),
            series: Default::default(),
            epoch: Instant::now(),
            workload_info: {
                let g = IntGaugeVec::new(
                    Opts::new(WORKLOAD_INFO, "Who this sidecar serves (value is always 1)"),
                    &["workload", "namespace", "principal", "trust_domain_aliases"],
                )
                .expect("static gauge");
                registry
                    .register(Box::new(g.clone()))
                    .expect("registered once");
                g
            },
            plaintext_sources: PlaintextSources::default(),
            refusals: Refusals::default(),
            unmeshed_destinations: PlaintextSources::default(),
            registry,
        }
    }

    /// Records a proxied connection from now until the returned recorder drops.
    pub fn connection(&self, labels: ConnectionLabels, direction: &str) -> ConnectionRecorder {
        let series = {
            // A poisoned lock only means another connection panicked mid-update; the map
            // itself is still whole.
            let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let series = map.entry(labels).or_insert_with_key(|labels| {
                let values = labels.values();
                let security = labels.connection_security_policy;
                Arc::new(Series {
                    opened: self.tcp_opened.with_label_values(&values),
                    closed: self.tcp_closed.with_label_values(&values),
                    sent: self.tcp_sent_bytes.with_label_values(&values),
                    received: self.tcp_received_bytes.with_label_values(&values),
                    active: self
                        .active_connections
                        .with_label_values(&[direction, security]),
                    open: AtomicUsize::new(0),
                    last_used: AtomicU64::new(0),
                    epoch: self.epoch,
                })
            });
            // Counted under the lock, so a sweep never drops a series a connection is joining.
            series.open.fetch_add(1, Ordering::AcqRel);
            series.clone()
        };
        series.touch();
        series.opened.inc();
        series.active.inc();
        ConnectionRecorder {
            received: series.received.clone(),
            sent: series.sent.clone(),
            closed: series.closed.clone(),
            active: series.active.clone(),
            series: Some(series),
        }
    }

    /// Drops the Istio TCP series of peers with no open connection for `idle`, so that a
    /// long-running sidecar talking to many short-lived peers keeps a bounded number of series.
    /// Returns how many label sets were dropped.
    pub fn sweep_idle(&self, idle: Duration) -> usize {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<ConnectionLabels> = map
            .iter()
            .filter(|(_, s)| s.open.load(Ordering::Acquire) == 0 && s.idle_for() >= idle)
            .map(|(l, _)| l.clone())
            .collect();
        for labels in &stale {
            let values = labels.values();
            for vec in [
                &self.tcp_opened,
                &self.tcp_closed,
                &self.tcp_sent_bytes,
                &self.tcp_received_bytes,
            ] {
                let _ = vec.remove_label_values(&values);
            }
            map.remove(labels);
        }
        stale.len()
    }

    /// The Prometheus text exposition of every metric.
    /// Drops the per-policy series (`authorization_decisions`, `authz_dry_run`) of policies
    /// `keep` says are gone (removed or renamed in the policy file), as idle Istio series are
    /// swept: a policy file rewritten many times must not leave a series per old name.
    /// Returns how many series went.
    pub fn forget_policies(&self, keep: impl Fn(&str) -> bool) -> usize {
        use prometheus::core::Collector;
        let mut dropped = 0;
        for vec in [&self.authorization_decisions, &self.authz_dry_run] {
            for family in vec.collect() {
                for metric in family.get_metric() {
                    let labels: HashMap<&str, &str> = metric
                        .get_label()
                        .iter()
                        .map(|l| (l.name(), l.value()))
                        .collect();
                    if labels.get("policy").is_some_and(|p| !keep(p)) && vec.remove(&labels).is_ok()
                    {
                        dropped += 1;
                    }
                }
            }
        }
        dropped
    }

    pub fn render(&self) -> String {
        self.read_heap();
        let mut out = String::new();
        // Encoding into a String only fails on a formatter error, which String never returns.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// How to read the heap: `(in use, free)` bytes. The binary sets it (the allocator's own
/// account needs `unsafe`, which this library does not contain); unset, no heap gauge.
pub static HEAP: std::sync::OnceLock<fn() -> (usize, usize)> = std::sync::OnceLock::new();

impl Metrics {
    fn read_heap(&self) {
        if let Some(read) = HEAP.get() {
            let (in_use, free) = read();
            for (state, bytes) in [("in_use", in_use), ("free", free)] {
                self.heap
                    .with_label_values(&[state])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {

    /// Series of policies no longer in force go; those in force, and the decision labels
    /// that name no policy, stay (issue 25).
    #[test]
    fn decision_series_of_removed_policies_are_dropped() {
        let m = Metrics::new();
        for (policy, action) in [
            ("shop/old", "allow"),
            ("shop/kept", "deny"),
            ("(no ALLOW policy matched)", "deny"),
        ] {
            m.authorization_decisions
                .with_label_values(&[policy, action])
                .inc();
        }
        m.authz_dry_run
            .with_label_values(&["shop/old-dry", "deny"])
            .inc();
        let dropped = m.forget_policies(|p| p == "shop/kept" || p.starts_with('('));
        assert_eq!(dropped, 2);
        let text = m.render();
        assert!(!text.contains("shop/old"), "{text}");
        assert!(text.contains("policy=\"shop/kept\""), "{text}");
        assert!(text.contains("(no ALLOW policy matched)"), "{text}");
    }
    use super::*;

    #[test]
    fn counters_render_in_prometheus_text_format() {
        let m = Metrics::new();
        m.inbound_detections
            .with_label_values(&["8080", "plaintext"])
            .inc();
        m.strict_refusals
            .with_label_values(&["8080", "plaintext"])
            .inc();
        m.policy_reloads.with_label_values(&["failure"]).inc();
        let text = m.render();
        assert!(
            text.contains("l4mesh_inbound_detections_total{outcome=\"plaintext\",port=\"8080\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("l4mesh_strict_refusals_total{port=\"8080\",protocol=\"plaintext\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("l4mesh_policy_reloads_total{result=\"failure\"} 1"),
            "{text}"
        );
        // Two apps in one process: separate registries, no collision.
        let _second = Metrics::new();
    }

    fn labels(principal: &str) -> ConnectionLabels {
        ConnectionLabels {
            source_workload_namespace: "shop".into(),
            source_principal: principal.into(),
            destination_workload: "orders".into(),
            destination_workload_namespace: "shop".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/orders".into(),
            connection_security_policy: "mutual_tls",
            ..ConnectionLabels::unknown("destination")
        }
    }

    #[test]
    fn a_connection_is_opened_counted_while_open_and_closed_on_drop() {
        let m = Metrics::new();
        let c = m.connection(labels("spiffe://cluster.local/ns/shop/sa/a"), "inbound");
        c.received.inc_by(100);
        c.sent.inc_by(7);
        let text = m.render();
        assert!(
            text.contains(
                "l4mesh_active_connections{direction=\"inbound\",security=\"mutual_tls\"} 1"
            ),
            "{text}"
        );
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_string()
        };
        assert!(line("istio_tcp_received_bytes_total{").ends_with(" 100"));
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 7"));
        assert!(line("istio_tcp_connections_opened_total{")
            .contains("connection_security_policy=\"mutual_tls\""));
        assert!(line("istio_tcp_connections_opened_total{").contains("request_protocol=\"tcp\""));
        assert!(line("istio_tcp_connections_closed_total{").ends_with(" 0"));
        drop(c);
        let text = m.render();
        assert!(text.contains(
            "l4mesh_active_connections{direction=\"inbound\",security=\"mutual_tls\"} 0"
        ));
        let closed = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_closed_total{"));
        assert!(closed.unwrap().ends_with(" 1"), "{text}");
    }

    #[test]
    fn refusals_are_bounded_in_count_and_size() {
        let r = Refusals::default();
        let src: std::net::SocketAddr = "10.0.0.1:4000".parse().unwrap();
        for i in 0..(MAX_REFUSALS + 20) {
            let context = RefusalContext {
                port: Some(8080),
                peer: Some("x".repeat(10_000)),
                policy: Some(format!("shop/p{i}")),
            };
            r.record("inbound", src, "denied", context, &"denied");
        }
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(list.len(), MAX_REFUSALS);
        assert_eq!(list[0]["policy"], format!("shop/p{}", MAX_REFUSALS + 19));
        assert!(list[0]["peer"].as_str().unwrap().len() <= MAX_REFUSAL_TEXT + 3);
    }

    #[test]
    fn plaintext_sources_are_bounded() {
        let p = PlaintextSources::default();
        for i in 0..100u8 {
            p.record(8080, std::net::IpAddr::from([10, 0, 0, i]), "plaintext");
        }
        p.record(8080, std::net::IpAddr::from([10, 0, 0, 99]), "plaintext");
        let v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        let seen = v["8080"].as_array().unwrap();
        assert_eq!(seen.len(), MAX_SOURCES_PER_PORT);
        let last = seen.iter().find(|s| s["address"] == "10.0.0.99").unwrap();
        assert_eq!(last["connections"], 2);
        for port in 0..200u16 {
            p.record(port, std::net::IpAddr::from([10, 0, 0, 1]), "timeout");
        }
        let v: serde_json::Value = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(v.as_object().unwrap().len(), MAX_PORTS);
    }

    #[test]
    fn idle_series_are_dropped_and_open_ones_kept() {
        let m = Metrics::new();
        let open = m.connection(labels("spiffe://cluster.local/ns/shop/sa/open"), "inbound");
        drop(m.connection(labels("spiffe://cluster.local/ns/shop/sa/gone"), "inbound"));
        assert_eq!(m.sweep_idle(Duration::ZERO), 1);
        let text = m.render();
        assert!(!text.contains("sa/gone"), "{text}");
        assert!(text.contains("sa/open"), "{text}");
        drop(open);
    }
}
