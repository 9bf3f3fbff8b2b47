//! Metrics: every counter l4mesh keeps, registered on a registry the app owns (no globals, so
//! two apps in one test process do not collide). Passed around as `Arc<Metrics>`; the stages
//! of a connection record into it. Label values come from config and detection results, never
//! from client addresses, so the number of series stays bounded.

use prometheus::{IntCounterVec, Opts, Registry};

/// The l4mesh counters.
pub struct Metrics {
    pub registry: Registry,
    /// Inbound detection decisions by destination port and outcome (`mtls`, `plaintext`,
    /// `foreign_tls`, `timeout`, or `refused_strict` when STRICT refused the connection).
    pub inbound_detections: IntCounterVec,
    /// STRICT refusals by destination port and what the client spoke.
    pub strict_refusals: IntCounterVec,
    /// Policy file reloads by result (`success`, `failure`).
    pub policy_reloads: IntCounterVec,
    /// Authorization decisions by deciding policy (`ns/name`) and action (`allow`, `deny`,
    /// `audit`).
    pub authorization_decisions: IntCounterVec,
    /// Failed mTLS handshakes by direction (`inbound`, `outbound`) and reason (`unknown_ca`,
    /// `expired`, `bad_identity`, `timeout`, `protocol`, ...; see `tls::HandshakeError`).
    pub handshake_failures: IntCounterVec,
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
            inbound_detections: counter(
                "l4mesh_inbound_detections_total",
                "Inbound connections by what their first bytes were and what was done",
                &["port", "outcome"],
            ),
            strict_refusals: counter(
                "l4mesh_strict_refusals_total",
                "Inbound connections refused because the port is STRICT and the client did not speak mesh mTLS",
                &["port", "protocol"],
            ),
            policy_reloads: counter(
                "l4mesh_policy_reloads_total",
                "Policy file reloads by result; on failure the previous policy stays in force",
                &["result"],
            ),
            authorization_decisions: counter(
                "l4mesh_authorization_decisions_total",
                "Inbound authorization decisions by deciding AuthorizationPolicy and action",
                &["policy", "action"],
            ),
            handshake_failures: counter(
                "l4mesh_tls_handshake_failures_total",
                "Failed mTLS handshakes by direction and reason",
                &["direction", "reason"],
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on a formatter error, which String never returns.
        let _ = prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
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
}
