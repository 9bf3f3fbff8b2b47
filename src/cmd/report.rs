//! Migration report: `l4mesh migration-report`. Not on the data path: it reads what sidecars
//! counted (their `/metrics`, or Prometheus' HTTP API) and says, per workload and port,
//! whether anything other than mesh mTLS arrived during a window, and from where, and so
//! whether switching that workload to STRICT would refuse somebody.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Serialize;
use thiserror::Error;

use crate::metrics;
use crate::proxy::sniff::Protocol;

/// Why a report could not be made.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("{url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url}: unexpected answer: {reason}")]
    Answer { url: String, reason: String },
}

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text exposition format (the subset sidecars emit: no timestamps
/// needed, comments skipped). Lines that do not parse are skipped.
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// What arrived on one port during the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PortTraffic {
    /// 0 for the ports the sidecar counts together as `other` (not configured anywhere).
    pub port: u16,
    pub mtls: u64,
    pub plaintext: u64,
    pub foreign_tls: u64,
    /// Clients that sent nothing before the detect timeout (server-first protocols).
    pub timeout: u64,
    /// Already refused because the port is STRICT.
    pub refused_strict: u64,
    /// Recent non-mTLS sources, when the sidecar was asked directly.
    pub sources: Vec<Source>,
    pub verdict: Verdict,
}

/// A non-mTLS client seen on a port.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Source {
    pub address: String,
    pub connections: u64,
    pub protocol: String,
    pub last_seen: u64,
    /// The Kubernetes Service an un-meshed destination was reached through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// A peer on an alias trust domain, and how many connections it made during the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AliasPeer {
    pub principal: String,
    /// `inbound` (a client of this workload) or `outbound` (a server it reached).
    pub direction: &'static str,
    pub connections: u64,
}

/// Whether STRICT would refuse somebody.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Only mesh mTLS arrived.
    Safe,
    /// Something else arrived: STRICT would refuse it.
    NotSafe,
    /// Nothing arrived: no evidence either way.
    #[default]
    NoTraffic,
}

impl PortTraffic {
    pub fn non_mtls(&self) -> u64 {
        self.plaintext + self.foreign_tls + self.timeout
    }

    fn judge(&mut self) {
        self.verdict = if self.non_mtls() > 0 {
            Verdict::NotSafe
        } else if self.mtls > 0 {
            Verdict::Safe
        } else {
            Verdict::NoTraffic
        };
    }
}

/// The report for one sidecar.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkloadReport {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    /// Where the numbers came from (a sidecar URL or a Prometheus instance label).
    pub target: String,
    pub ports: Vec<PortTraffic>,
    pub verdict: Verdict,
    /// Servers this workload reached in plaintext during the window because they have no
    /// sidecar yet (`auto`): the other half of the migration. Admin port only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unmeshed_destinations: Vec<Source>,
    /// The trust domain aliases the sidecar accepts (`identity.trust_domain_aliases`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domain_aliases: Vec<String>,
    /// Peers that presented a certificate of one of those aliases during the window: while
    /// there are any, dropping the alias would refuse them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alias_peers: Vec<AliasPeer>,
    /// Something the reader should know about how complete this report is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl WorkloadReport {
    /// Builds the report from detection counts by `(port, outcome)`.
    pub fn new(
        target: &str,
        info: Option<&BTreeMap<String, String>>,
        counts: &BTreeMap<(u16, String), u64>,
    ) -> WorkloadReport {
        let label = |k: &str| {
            info.and_then(|i| i.get(k))
                .cloned()
                .unwrap_or_else(|| "unknown".to_string())
        };
        let mut ports: BTreeMap<u16, PortTraffic> = BTreeMap::new();
        for ((port, outcome), n) in counts {
            let p = ports.entry(*port).or_insert_with(|| PortTraffic {
                port: *port,
                ..PortTraffic::default()
            });
            match Protocol::from_name(outcome) {
                Some(Protocol::MeshTls) => p.mtls += n,
                Some(Protocol::Plaintext) => p.plaintext += n,
                Some(Protocol::ForeignTls) => p.foreign_tls += n,
                Some(Protocol::Timeout) => p.timeout += n,
                None if outcome == metrics::REFUSED_STRICT => p.refused_strict += n,
                None => {}
            }
        }
        let mut ports: Vec<PortTraffic> = ports.into_values().collect();
        for p in &mut ports {
            p.judge();
        }
        let verdict = if ports.iter().any(|p| p.verdict == Verdict::NotSafe) {
            Verdict::NotSafe
        } else if ports.iter().any(|p| p.verdict == Verdict::Safe) {
            Verdict::Safe
        } else {
            Verdict::NoTraffic
        };
        let trust_domain_aliases = info
            .and_then(|i| i.get("trust_domain_aliases"))
            .map(|a| {
                a.split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        WorkloadReport {
            workload: label("workload"),
            namespace: label("namespace"),
            principal: label("principal"),
            target: target.to_string(),
            ports,
            verdict,
            unmeshed_destinations: Vec::new(),
            trust_domain_aliases,
            alias_peers: Vec::new(),
            note: None,
        }
    }

    /// The alias trust domain a `spiffe://` ID is in, if it is in one of this sidecar's.
    fn alias_of(&self, principal: &str) -> Option<&str> {
        let domain = principal.strip_prefix("spiffe://")?.split('/').next()?;
        self.trust_domain_aliases
            .iter()
            .find(|a| *a == domain)
            .map(String::as_str)
    }

    /// Keeps, of the connections opened during the window (Istio's metric series with their
    /// counts), those whose peer presented a certificate of one of this sidecar's aliases.
    pub fn add_alias_peers<'a>(
        &mut self,
        opened: impl IntoIterator<Item = (&'a BTreeMap<String, String>, u64)>,
    ) {
        if self.trust_domain_aliases.is_empty() {
            return;
        }
        let mut peers: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
        for (labels, n) in opened {
            // The server counts its clients, the client the servers it reached.
            let (direction, key) = match labels.get("reporter").map(String::as_str) {
                Some("destination") => ("inbound", "source_principal"),
                Some("source") => ("outbound", "destination_principal"),
                _ => continue,
            };
            let Some(principal) = labels.get(key) else {
                continue;
            };
            if n > 0 && self.alias_of(principal).is_some() {
                *peers.entry((direction, principal.clone())).or_default() += n;
            }
        }
        self.alias_peers = peers
            .into_iter()
            .map(|((direction, principal), connections)| AliasPeer {
                principal,
                direction,
                connections,
            })
            .collect();
    }
}

/// A `port` label as a number: the sidecar labels ports nobody configured `other` (see
/// `ProxyInputs::port_label`), which the report holds as port 0.
fn port_of(label: &str) -> Option<u16> {
    match label {
        metrics::OTHER_PORT => Some(0),
        p => p.parse().ok(),
    }
}

/// Each series of counter `name` in `after`, with its count minus the one in `before` (a
/// counter that went down was reset: its new value is what happened since).
pub fn series_deltas<'a>(
    before: &[Sample],
    after: &'a [Sample],
    name: &str,
) -> Vec<(&'a BTreeMap<String, String>, u64)> {
    let earlier: BTreeMap<&BTreeMap<String, String>, f64> = before
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (&s.labels, s.value))
        .collect();
    after
        .iter()
        .filter(|s| s.name == name)
        .map(|a| {
            let was = earlier.get(&a.labels).copied().unwrap_or(0.0);
            let delta = if a.value >= was {
                a.value - was
            } else {
                a.value
            };
            (&a.labels, delta.round() as u64)
        })
        .collect()
}

/// Detection counts by `(port, outcome)` during the window.
pub fn detection_deltas(before: &[Sample], after: &[Sample]) -> BTreeMap<(u16, String), u64> {
    let mut out = BTreeMap::new();
    for (labels, n) in series_deltas(before, after, metrics::INBOUND_DETECTIONS) {
        let port = labels.get("port").and_then(|p| port_of(p));
        if let (Some(port), Some(outcome)) = (port, labels.get("outcome")) {
            *out.entry((port, outcome.clone())).or_default() += n;
        }
    }
    out
}

/// The labels of `l4mesh_workload_info` in a scrape.
pub fn workload_info(samples: &[Sample]) -> Option<&BTreeMap<String, String>> {
    samples
        .iter()
        .find(|s| s.name == metrics::WORKLOAD_INFO)
        .map(|s| &s.labels)
}

/// "1 mTLS connection", "2 mTLS connections".
fn count(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// The report as a person reads it.
pub fn render_text(reports: &[WorkloadReport], window: Duration) -> String {
    let mut out = format!(
        "Inbound traffic during the last {}:\n",
        humantime::format_duration(window)
    );
    for r in reports {
        out.push_str(&format!(
            "\n{}/{} ({}) at {}\n",
            r.namespace, r.workload, r.principal, r.target
        ));
        if r.ports.is_empty() {
            out.push_str("  no inbound connections\n");
        }
        if let Some(note) = &r.note {
            out.push_str(&format!("  note: {note}\n"));
        }
        for p in &r.ports {
            let what = match p.verdict {
                Verdict::Safe => {
                    format!("safe: {}, nothing else", count(p.mtls, "mTLS connection"))
                }
                Verdict::NoTraffic => "no traffic: nothing to go on".to_string(),
                Verdict::NotSafe => {
                    let mut parts = Vec::new();
                    for (n, kind) in [
                        (p.plaintext, "plaintext connection"),
                        (p.foreign_tls, "foreign TLS connection"),
                        (p.timeout, "silent (server-first) connection"),
                    ] {
                        if n > 0 {
                            parts.push(count(n, kind));
                        }
                    }
                    let mut s = format!(
                        "NOT SAFE: {}; {} besides",
                        parts.join(", "),
                        count(p.mtls, "mTLS connection"),
                    );
                    if !p.sources.is_empty() {
                        // What each source sent during the window, not since the sidecar began.
                        let from: Vec<String> = p
                            .sources
                            .iter()
                            .map(|s| format!("{} ({} {})", s.address, s.connections, s.protocol))
                            .collect();
                        s.push_str(&format!("; non-mTLS from {}", from.join(", ")));
                    }
                    s
                }
            };
            match p.port {
                0 => out.push_str(&format!("  other ports: {what}\n")),
                port => out.push_str(&format!("  port {port}: {what}\n")),
            }
        }
        out.push_str(&match r.verdict {
            Verdict::Safe => format!(
                "  => safe to switch {}/{} to STRICT\n",
                r.namespace, r.workload
            ),
            Verdict::NotSafe => format!(
                "  => not safe: STRICT on {}/{} would refuse the clients above\n",
                r.namespace, r.workload
            ),
            Verdict::NoTraffic => "  => no traffic in the window: widen it to decide\n".into(),
        });
        if !r.trust_domain_aliases.is_empty() {
            let aliases = r.trust_domain_aliases.join(", ");
            if r.alias_peers.is_empty() {
                out.push_str(&format!(
                    "  trust domain aliases ({aliases}): no peer presented a certificate of one during the window\n"
                ));
            } else {
                let peers: Vec<String> = r
                    .alias_peers
                    .iter()
                    .map(|p| {
                        let n = count(p.connections, &format!("{} connection", p.direction));
                        format!("{} ({n})", p.principal)
                    })
                    .collect();
                out.push_str(&format!(
                    "  trust domain aliases ({aliases}): still in use by {}: dropping an alias would refuse them\n",
                    peers.join(", ")
                ));
            }
            if let Some(own) = r.alias_of(&r.principal) {
                out.push_str(&format!(
                    "  this workload's own certificate is still in alias {own}: reissue it before dropping the alias\n"
                ));
            }
        }
        if !r.unmeshed_destinations.is_empty() {
            let to: Vec<String> = r
                .unmeshed_destinations
                .iter()
                .map(|d| {
                    let via = d
                        .service
                        .as_ref()
                        .map_or(String::new(), |s| format!("{s}, "));
                    format!(
                        "{} ({via}{})",
                        d.address,
                        count(d.connections, "connection")
                    )
                })
                .collect();
            out.push_str(&format!(
                "  outbound: clients of this workload still reach un-meshed servers (plaintext, no sidecar there yet): {}\n",
                to.join(", ")
            ));
        }
    }
    out
}

/// The report for machines.
pub fn render_json(reports: &[WorkloadReport], window: Duration) -> String {
    let doc = serde_json::json!({
        "window_seconds": window.as_secs(),
        "workloads": reports,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
}

/// GETs `url` (plain HTTP/1.1) and returns the body.
pub async fn http_get(url: &str) -> Result<String, ReportError> {
    http_request(hyper::Method::GET, url).await
}

/// Sends a bodiless `method` request to `url` (plain HTTP/1.1) and returns the body of a 2xx
/// answer.
pub async fn http_request(method: hyper::Method, url: &str) -> Result<String, ReportError> {
    let fail = |reason: String| ReportError::Fetch {
        url: url.to_string(),
        reason,
    };
    let uri: hyper::Uri = url.parse().map_err(|e| fail(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(fail("only http:// URLs are supported".into()));
    }
    let host = uri
        .host()
        .ok_or_else(|| fail("no host".into()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let host_port = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]:{port}"),
        Err(_) => format!("{}:{port}", host.trim_matches(['[', ']'])),
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(host_port.as_str()),
    )
    .await
    .map_err(|_| fail("connect timed out".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host_port.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| fail("no answer within 30s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        return Err(ReportError::Answer {
            url: url.to_string(),
            reason: format!("HTTP {status}: {body}"),
        });
    }
    Ok(body)
}

/// A sidecar's recent non-mTLS sources, per port.
async fn plaintext_sources(url: &str) -> Result<BTreeMap<String, Vec<Source>>, ReportError> {
    serde_json::from_str(&http_get(url).await?).map_err(|e| ReportError::Answer {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

/// What each source sent between two readings of `/plaintext_sources`: the sidecar keeps
/// lifetime counts, so the window's are the differences. A source absent before (or
/// evicted and seen again, so its count went down) sent all it shows now.
fn window_sources(
    before: &BTreeMap<String, Vec<Source>>,
    after: &BTreeMap<String, Vec<Source>>,
) -> BTreeMap<String, Vec<Source>> {
    after
        .iter()
        .map(|(port, seen)| {
            let earlier = before.get(port);
            let sent: Vec<Source> = seen
                .iter()
                .filter_map(|s| {
                    let was = earlier
                        .and_then(|b| b.iter().find(|b| b.address == s.address))
                        .map_or(0, |b| b.connections);
                    let n = match s.connections.checked_sub(was) {
                        Some(n) => n,
                        None => s.connections,
                    };
                    (n > 0).then(|| Source {
                        connections: n,
                        ..s.clone()
                    })
                })
                .collect();
            (port.clone(), sent)
        })
        .filter(|(_, sent)| !sent.is_empty())
        .collect()
}

/// Scrapes each sidecar (its stats base URL, e.g. `http://10.1.2.3:15020`) twice, `window`
/// apart, and reports what arrived in between, with the non-mTLS sources it remembers.
pub async fn from_sidecars(
    sidecars: &[String],
    window: Duration,
) -> Result<Vec<WorkloadReport>, ReportError> {
    let base = |s: &String| s.trim_end_matches('/').to_string();
    let mut before = Vec::new();
    for s in sidecars {
        let metrics = parse_exposition(&http_get(&format!("{}/metrics", base(s))).await?);
        let sources = plaintext_sources(&format!("{}/plaintext_sources", base(s))).await;
        let unmeshed = plaintext_sources(&format!("{}/unmeshed_destinations", base(s))).await;
        before.push((metrics, sources.ok(), unmeshed.ok()));
    }
    tokio::time::sleep(window).await;
    let mut reports = Vec::new();
    for (s, (before, sources_before, unmeshed_before)) in sidecars.iter().zip(before) {
        let after = parse_exposition(&http_get(&format!("{}/metrics", base(s))).await?);
        let mut report =
            WorkloadReport::new(s, workload_info(&after), &detection_deltas(&before, &after));
        report.add_alias_peers(series_deltas(&before, &after, metrics::TCP_OPENED));
        // Source addresses are served on the admin port only (issue 13: the stats port is
        // open to every pod); from a stats URL the report has counts but no addresses.
        let sources_url = format!("{}/plaintext_sources", base(s));
        let sources = match plaintext_sources(&sources_url).await {
            Ok(after) => window_sources(&sources_before.unwrap_or_default(), &after),
            Err(e) => {
                // One line, the URL once (the error names it; an answer's body may hold
                // newlines).
                let e = e
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                report.note = Some(format!(
                    "{e}: source addresses come from the admin port (e.g. http://127.0.0.1:15000)"
                ));
                BTreeMap::new()
            }
        };
        for p in &mut report.ports {
            if let Some(seen) = sources.get(&p.port.to_string()) {
                p.sources = seen.clone();
            }
        }
        if let (Some(before), Ok(after)) = (
            unmeshed_before,
            plaintext_sources(&format!("{}/unmeshed_destinations", base(s))).await,
        ) {
            for (port, seen) in window_sources(&before, &after) {
                report
                    .unmeshed_destinations
                    .extend(seen.into_iter().map(|d| Source {
                        address: match d.address.parse::<std::net::Ipv6Addr>() {
                            Ok(_) => format!("[{}]:{port}", d.address),
                            Err(_) => format!("{}:{port}", d.address),
                        },
                        ..d
                    }));
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Asks Prometheus (its base URL) what every sidecar counted over `window`. Prometheus holds
/// no source addresses (they are never label values), so ask sidecars for those.
pub async fn from_prometheus(
    prometheus: &str,
    window: Duration,
) -> Result<Vec<WorkloadReport>, ReportError> {
    let base = prometheus.trim_end_matches('/');
    let query = |q: String| async move {
        let url = format!(
            "{base}/api/v1/query?query={}",
            percent_encoding::utf8_percent_encode(&q, percent_encoding::NON_ALPHANUMERIC)
        );
        let body = http_get(&url).await?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| ReportError::Answer {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if v["status"] != "success" {
            return Err(ReportError::Answer { url, reason: body });
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    let secs = window.as_secs().max(1);
    let counts = query(format!(
        "increase({}[{secs}s])",
        metrics::INBOUND_DETECTIONS
    ))
    .await?;
    let infos = query(metrics::WORKLOAD_INFO.to_string()).await?;
    let opened = query(format!("increase({}[{secs}s])", metrics::TCP_OPENED)).await?;
    let labels_of = |r: &serde_json::Value| -> BTreeMap<String, String> {
        r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    };
    let value_of = |r: &serde_json::Value| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            .round() as u64
    };
    let mut by_instance: BTreeMap<String, BTreeMap<(u16, String), u64>> = BTreeMap::new();
    for r in &counts {
        let l = labels_of(r);
        let (Some(instance), Some(port), Some(outcome)) =
            (l.get("instance"), l.get("port"), l.get("outcome"))
        else {
            continue;
        };
        let Some(port) = port_of(port) else {
            continue;
        };
        let n = value_of(r);
        *by_instance
            .entry(instance.clone())
            .or_default()
            .entry((port, outcome.clone()))
            .or_default() += n;
    }
    let info: BTreeMap<String, BTreeMap<String, String>> = infos
        .iter()
        .map(labels_of)
        .filter_map(|l| Some((l.get("instance")?.clone(), l)))
        .collect();
    for instance in info.keys() {
        by_instance.entry(instance.clone()).or_default();
    }
    let opened: Vec<(BTreeMap<String, String>, u64)> =
        opened.iter().map(|r| (labels_of(r), value_of(r))).collect();
    Ok(by_instance
        .iter()
        .map(|(instance, counts)| {
            let mut r = WorkloadReport::new(instance, info.get(instance), counts);
            r.add_alias_peers(
                opened
                    .iter()
                    .filter(|(l, _)| l.get("instance") == Some(instance))
                    .map(|(l, n)| (l, *n)),
            );
            // increase() extrapolates to the window's edges: 30 connections can read as 34.
            r.note = Some(
                "counts are Prometheus increase() estimates, not exact; ask the sidecar (--sidecar) for exact counts and source addresses".to_string(),
            );
            r
        })
        .collect())
}

/// `migration-report`'s numbers: from Prometheus over `window` (1 h unless given), else
/// from the sidecars watched for `window` (30 s unless given). Returns the window used.
pub async fn gather(
    sidecars: &[String],
    prometheus: Option<&str>,
    window: Option<Duration>,
) -> Result<(Vec<WorkloadReport>, Duration), ReportError> {
    match prometheus {
        Some(url) => {
            let w = window.unwrap_or(Duration::from_secs(3600));
            from_prometheus(url, w).await.map(|r| (r, w))
        }
        None => {
            let w = window.unwrap_or(Duration::from_secs(30));
            from_sidecars(sidecars, w).await.map(|r| (r, w))
        }
    }
}

/// `wait-ready`: asks `url` every 200 ms until it answers 2xx, for at most `timeout`.
pub async fn wait_ready(url: &str, timeout: Duration) -> Result<(), ReportError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match http_get(url).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP l4mesh_inbound_detections_total x\n# TYPE l4mesh_inbound_detections_total counter\nl4mesh_inbound_detections_total{outcome=\"mtls\",port=\"8080\"} 10\nl4mesh_inbound_detections_total{outcome=\"plaintext\",port=\"8080\"} 4\nl4mesh_workload_info{namespace=\"shop\",principal=\"spiffe://cluster.local/ns/shop/sa/orders\",workload=\"orders\"} 1\n";

    #[test]
    fn parses_the_text_format_with_escapes() {
        let s = parse_exposition(
            "a_total{x=\"q\\\"uote\",y=\"b\\\\s\"} 3\nplain 1.5\n# c\nbroken{ 1\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].labels["x"], "q\"uote");
        assert_eq!(s[0].labels["y"], "b\\s");
        assert_eq!(s[1].value, 1.5);
    }

    #[test]
    fn plaintext_in_the_window_is_not_safe_and_mtls_only_is_safe() {
        let before = parse_exposition(BEFORE);
        let after = parse_exposition(&BEFORE.replace("} 10", "} 15").replace("} 4", "} 6"));
        let r = WorkloadReport::new(
            "t",
            workload_info(&after),
            &detection_deltas(&before, &after),
        );
        assert_eq!(r.workload, "orders");
        assert_eq!(r.ports[0].mtls, 5);
        assert_eq!(r.ports[0].plaintext, 2);
        assert_eq!(r.verdict, Verdict::NotSafe);
        let text = render_text(std::slice::from_ref(&r), Duration::from_secs(60));
        assert!(
            text.contains(
                "port 8080: NOT SAFE: 2 plaintext connections; 5 mTLS connections besides"
            ),
            "{text}"
        );
        assert!(text.contains("not safe: STRICT on shop/orders"), "{text}");

        // Plaintext happened before the window only: safe now.
        let after = parse_exposition(&BEFORE.replace("} 10", "} 12"));
        let r = WorkloadReport::new(
            "t",
            workload_info(&after),
            &detection_deltas(&before, &after),
        );
        assert_eq!(r.verdict, Verdict::Safe);
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&[r], Duration::from_secs(60))).unwrap();
        assert_eq!(json["workloads"][0]["verdict"], "safe");
        assert_eq!(json["workloads"][0]["ports"][0]["plaintext"], 0);

        // Nothing at all: no verdict.
        let r = WorkloadReport::new("t", None, &detection_deltas(&before, &before));
        assert_eq!(r.verdict, Verdict::NoTraffic);
    }

    #[test]
    fn a_reset_counter_counts_from_zero() {
        let before = parse_exposition(BEFORE);
        let after = parse_exposition(
            "l4mesh_inbound_detections_total{outcome=\"plaintext\",port=\"8080\"} 1\n",
        );
        assert_eq!(
            detection_deltas(&before, &after)[&(8080, "plaintext".to_string())],
            1
        );
    }

    #[test]
    fn ports_counted_as_other_are_reported_as_other_ports() {
        let scrape = |n: u32| {
            parse_exposition(&format!(
                "l4mesh_inbound_detections_total{{outcome=\"plaintext\",port=\"other\"}} {n}\n"
            ))
        };
        let deltas = detection_deltas(&scrape(1), &scrape(4));
        assert_eq!(deltas[&(0, "plaintext".to_string())], 3);
        let report = WorkloadReport::new("s", None, &deltas);
        let text = render_text(&[report], Duration::from_secs(1));
        assert!(text.contains("other ports: NOT SAFE"), "{text}");
    }

    /// Mid-migration to a new trust domain: which peers still present a certificate of the
    /// alias, in either direction, during the window (not before it), and the workload's own.
    #[test]
    fn peers_still_on_an_alias_trust_domain_are_named() {
        let scrape = |client: u32, server: u32, current: u32| {
            parse_exposition(&format!(
                "l4mesh_workload_info{{namespace=\"shop\",principal=\"spiffe://old.example/ns/shop/sa/orders\",trust_domain_aliases=\"old.example\",workload=\"orders\"}} 1\n\
                 istio_tcp_connections_opened_total{{reporter=\"destination\",source_principal=\"spiffe://old.example/ns/shop/sa/web\",destination_principal=\"spiffe://old.example/ns/shop/sa/orders\"}} {client}\n\
                 istio_tcp_connections_opened_total{{reporter=\"source\",source_principal=\"spiffe://old.example/ns/shop/sa/orders\",destination_principal=\"spiffe://old.example/ns/shop/sa/db\"}} {server}\n\
                 istio_tcp_connections_opened_total{{reporter=\"destination\",source_principal=\"spiffe://new.example/ns/shop/sa/cart\",destination_principal=\"spiffe://old.example/ns/shop/sa/orders\"}} {current}\n"
            ))
        };
        let report = |before: &[Sample], after: &[Sample]| {
            let mut r = WorkloadReport::new("t", workload_info(after), &BTreeMap::new());
            r.add_alias_peers(series_deltas(before, after, metrics::TCP_OPENED));
            r
        };
        let (before, after) = (scrape(5, 2, 7), scrape(8, 3, 9));
        let r = report(&before, &after);
        assert_eq!(r.trust_domain_aliases, ["old.example"]);
        let text = render_text(&[r], Duration::from_secs(30));
        assert!(
            text.contains("trust domain aliases (old.example): still in use by spiffe://old.example/ns/shop/sa/web (3 inbound connections), spiffe://old.example/ns/shop/sa/db (1 outbound connection): dropping an alias would refuse them"),
            "{text}"
        );
        assert!(
            text.contains("own certificate is still in alias old.example"),
            "{text}"
        );
        // Old-domain traffic before the window only; the new domain's does not count.
        let r = report(&after, &scrape(8, 3, 12));
        assert!(r.alias_peers.is_empty());
        let text = render_text(&[r], Duration::from_secs(30));
        assert!(
            text.contains("trust domain aliases (old.example): no peer presented a certificate of one during the window"),
            "{text}"
        );
        // No aliases: nothing said.
        let plain = parse_exposition(BEFORE);
        let r = report(&plain, &plain);
        assert!(!render_text(&[r], Duration::from_secs(30)).contains("alias"));
    }

    /// Issue 16: per source, what it sent during the window (the sidecar keeps lifetime
    /// counts), and singular where it is one.
    #[test]
    fn sources_count_what_they_sent_in_the_window() {
        let source = |address: &str, connections| Source {
            address: address.to_string(),
            connections,
            protocol: "plaintext".to_string(),
            last_seen: 0,
            service: None,
        };
        let before = BTreeMap::from([("8080".to_string(), vec![source("10.0.0.12", 1)])]);
        let after = BTreeMap::from([(
            "8080".to_string(),
            vec![source("10.0.0.12", 5), source("10.0.0.13", 1)],
        )]);
        let window = window_sources(&before, &after);
        let sent: Vec<(String, u64)> = window["8080"]
            .iter()
            .map(|s| (s.address.clone(), s.connections))
            .collect();
        assert_eq!(sent, [("10.0.0.12".into(), 4), ("10.0.0.13".into(), 1)]);
        // Nothing new from anyone: no sources listed.
        assert!(window_sources(&after, &after).is_empty());

        let mut r = WorkloadReport::new(
            "t",
            None,
            &BTreeMap::from([
                ((8080, "plaintext".to_string()), 1),
                ((8080, "mtls".to_string()), 1),
            ]),
        );
        r.ports[0].sources = vec![source("10.0.0.13", 1)];
        let text = render_text(&[r], Duration::from_secs(2));
        assert!(
            text.contains("NOT SAFE: 1 plaintext connection; 1 mTLS connection besides; non-mTLS from 10.0.0.13 (1 plaintext)"),
            "{text}"
        );
    }
}
