//! Workload metadata that travels with a tunnel stream: the client sidecar says who its
//! workload is in the CONNECT's `baggage` header (as Istio ambient does), and the server
//! sidecar's Istio metrics name the source workload, app and version from it.

use crate::proxy::ProxyInputs;

/// Istio ambient's metadata header: `k8s.namespace.name=..,k8s.deployment.name=..,...`.
pub const BAGGAGE: &str = "baggage";

/// Who the client workload says it is, from the `baggage` header (as Istio ambient sends
/// it). Only labels metrics: the identity that policy decides on is the certificate's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub namespace: Option<String>,
    pub workload_name: Option<String>,
    pub app: Option<String>,
    pub version: Option<String>,
}

/// Values longer than this are ignored: labels come from here, and a peer must not be able
/// to mint huge series.
const MAX_BAGGAGE_VALUE: usize = 253;

impl Baggage {
    /// What this workload sends.
    pub fn of(inputs: &ProxyInputs) -> Baggage {
        let labels = &inputs.config.workload.labels;
        Baggage {
            namespace: Some(inputs.namespace.clone()).filter(|n| !n.is_empty()),
            workload_name: Some(inputs.workload_name.clone()).filter(|n| n != "unknown"),
            app: labels.get("app").cloned(),
            version: labels.get("version").cloned(),
        }
    }

    /// The header value: `k8s.namespace.name=shop,k8s.deployment.name=orders,...`.
    pub fn header(&self) -> String {
        [
            ("k8s.namespace.name", &self.namespace),
            ("k8s.deployment.name", &self.workload_name),
            ("service.name", &self.app),
            ("service.version", &self.version),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",")
    }

    pub fn parse(headers: &http::HeaderMap) -> Baggage {
        let mut b = Baggage::default();
        for value in headers.get_all(BAGGAGE) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let Some((k, v)) = item.trim().split_once('=') else {
                    continue;
                };
                // W3C baggage allows `;properties` after a value.
                let v = v.split(';').next().unwrap_or("").trim();
                if v.is_empty() || v.len() > MAX_BAGGAGE_VALUE {
                    continue;
                }
                let slot = match k.trim() {
                    "k8s.namespace.name" => &mut b.namespace,
                    "k8s.deployment.name"
                    | "k8s.statefulset.name"
                    | "k8s.daemonset.name"
                    | "k8s.cronjob.name"
                    | "k8s.job.name"
                    | "k8s.pod.name" => &mut b.workload_name,
                    "service.name" => &mut b.app,
                    "service.version" => &mut b.version,
                    _ => continue,
                };
                *slot = Some(v.to_string());
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_round_trips_and_ignores_what_it_does_not_know() {
        let b = Baggage {
            namespace: Some("shop".into()),
            workload_name: Some("orders".into()),
            app: Some("orders".into()),
            version: Some("v2".into()),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(BAGGAGE, b.header().parse().unwrap());
        assert_eq!(Baggage::parse(&headers), b);
        let mut headers = http::HeaderMap::new();
        let long = "x".repeat(MAX_BAGGAGE_VALUE + 1);
        headers.append(
            BAGGAGE,
            format!("k8s.cluster.name=c1, service.name=web;p=1,k8s.deployment.name={long}")
                .parse()
                .unwrap(),
        );
        headers.append(BAGGAGE, "service.version=v1,junk".parse().unwrap());
        let parsed = Baggage::parse(&headers);
        assert_eq!(parsed.app.as_deref(), Some("web"));
        assert_eq!(parsed.version.as_deref(), Some("v1"));
        assert_eq!(parsed.workload_name, None);
    }
}
