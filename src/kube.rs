//! The Kubernetes API client, off the data path: connects (in-cluster, or a kubeconfig), and
//! reads the few things the sidecar needs, each turned into a compact value at once so no whole
//! object is kept: a Service by ClusterIP, a Service's EndpointSlices (watched), a Pod by name
//! or by IP. `state::services` asks; nothing else here keeps state.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ListParams;
use kube::Api;
use thiserror::Error;

mod watch;
use watch::Event;

/// The label the injector puts on the pods it gives a sidecar (`cmd::inject`): such a pod
/// answers on :15008.
pub const MESHED_LABEL: &str = "l4mesh.io/injected";
/// Istio ambient's annotation on pods whose traffic ztunnel carries: HBONE on :15008 too.
const AMBIENT_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How many of a Service's Pods are listed with its first use.
const POD_PAGE: u32 = 100;

/// Why the API could not answer.
#[derive(Debug, Error)]
pub enum KubeError {
    #[error("no Kubernetes API configuration: {0}")]
    Config(String),
    #[error("the Kubernetes API refused: {0} (the sidecar's RBAC: get, list, watch on services, endpointslices, pods)")]
    Forbidden(String),
    #[error("the Kubernetes API did not answer: {0}")]
    Unreachable(String),
}

impl KubeError {
    /// The `state` label of `l4mesh_kubernetes_requests_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            KubeError::Config(_) => "config",
            KubeError::Forbidden(_) => "forbidden",
            KubeError::Unreachable(_) => "unreachable",
        }
    }
}

impl From<kube::Error> for KubeError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
                KubeError::Forbidden(e.to_string())
            }
            _ => KubeError::Unreachable(e.to_string()),
        }
    }
}

/// A connected client.
#[derive(Clone)]
pub struct Client(kube::Client);

impl Client {
    /// From `kubeconfig` when given, else the pod's in-cluster service-account token (or
    /// `KUBECONFIG`, as every Kubernetes client reads it).
    pub async fn connect(kubeconfig: Option<&PathBuf>) -> Result<Client, KubeError> {
        let config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                let options = kube::config::KubeConfigOptions::default();
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        Ok(Client(http2_client(config)?))
    }

    /// The Service whose ClusterIP (either family) is `ip`, if any. Asks the API server to
    /// filter (`spec.clusterIP`, Kubernetes 1.31+, so only that Service comes back); a
    /// server too old for that field selector is asked for every Service once, filtered here.
    pub async fn service_by_cluster_ip(
        &self,
        ip: IpAddr,
    ) -> Result<Option<ServiceInfo>, KubeError> {
        let api: Api<Service> = Api::all(self.0.clone());
        let selected = ListParams::default().fields(&format!("spec.clusterIP={ip}"));
        let list = match api.list(&selected).await {
            Ok(list) => list,
            // 400: "field label not supported" before 1.31.
            Err(kube::Error::Api(status)) if status.code == 400 => {
                api.list(&ListParams::default()).await?
            }
            Err(e) => return Err(e.into()),
        };
        Ok(list
            .items
            .iter()
            .filter_map(ServiceInfo::from_object)
            .find(|s| s.cluster_ips.contains(&ip)))
    }

    /// The Pod `namespace/name`, if it exists.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodInfo>, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        Ok(api
            .get_opt(name)
            .await?
            .as_ref()
            .and_then(PodInfo::from_object))
    }

    /// The Pods `selector` picks in `namespace`, at most `POD_PAGE` of them (a Service's
    /// backends past them are read one by one when chosen), finished ones left out.
    pub async fn pods_by_selector(
        &self,
        namespace: &str,
        selector: &str,
    ) -> Result<Vec<PodInfo>, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.0.clone(), namespace);
        let params = ListParams::default().labels(selector).limit(POD_PAGE);
        Ok(api
            .list(&params)
            .await?
            .items
            .iter()
            .filter_map(PodInfo::from_object)
            .filter(|p| !p.finished)
            .collect())
    }

    /// The running Pod whose address is `ip` (a pod IP dialled directly), if any.
    pub async fn pod_by_ip(&self, ip: IpAddr) -> Result<Option<PodInfo>, KubeError> {
        let api: Api<Pod> = Api::all(self.0.clone());
        let params = ListParams::default().fields(&format!("status.podIP={ip}"));
        let list = api.list(&params).await?;
        Ok(list
            .items
            .iter()
            .filter_map(PodInfo::from_object)
            .find(|p| p.ips.contains(&ip) && !p.finished))
    }

    /// Service `namespace/name` as it changes: `Some` each time it is (re-)read or changed,
    /// `None` when it is deleted (or a re-list no longer finds it). Resumes by itself, as
    /// `watch_slices`.
    pub fn watch_service(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl futures_util::Stream<Item = Result<Option<ServiceInfo>, KubeError>> + Send + 'static
    {
        use futures_util::StreamExt;
        let api: Api<Service> = Api::namespaced(self.0.clone(), namespace);
        let selection = watch::Selection {
            labels: None,
            fields: Some(format!("metadata.name={name}")),
            page: None,
        };
        let mut listed = false;
        watch::watch(api, selection).filter_map(move |event| {
            let out = match event {
                Ok(Event::Restarting) => {
                    listed = false;
                    None
                }
                Ok(Event::Applied(s)) => {
                    listed = true;
                    Some(Ok(ServiceInfo::from_object(&s)))
                }
                Ok(Event::Deleted(_)) => Some(Ok(None)),
                // Deleted while the watch was down: the re-list does not have it.
                Ok(Event::Listed) => (!listed).then_some(Ok(None)),
                Err(e) => Some(Err(e)),
            };
            std::future::ready(out)
        })
    }

    /// Every Service in the cluster as it changes (`discovery.services: watch_all`), listed
    /// 100 at a time so that no more than a page of whole objects is held at once; resumes by
    /// itself, as `watch_slices`. Services without a ClusterIP (headless) come as deleted:
    /// the index holds ClusterIPs only.
    pub fn watch_all_services(
        &self,
    ) -> impl futures_util::Stream<Item = Result<ServiceEvent, KubeError>> + Send + 'static {
        use futures_util::StreamExt;
        let api: Api<Service> = Api::all(self.0.clone());
        let selection = watch::Selection {
            labels: None,
            fields: None,
            page: Some(100),
        };
        let named = |s: &Service| {
            (
                s.metadata.namespace.clone().unwrap_or_default(),
                s.metadata.name.clone().unwrap_or_default(),
            )
        };
        watch::watch(api, selection).map(move |event| {
            event.map(|event| match event {
                Event::Applied(s) => match ServiceInfo::from_object(&s) {
                    Some(info) if !info.cluster_ips.is_empty() => ServiceEvent::Applied(info),
                    _ => ServiceEvent::Deleted(named(&s)),
                },
                Event::Deleted(s) => ServiceEvent::Deleted(named(&s)),
                Event::Restarting => ServiceEvent::Restarting,
                Event::Listed => ServiceEvent::Listed,
            })
        })
    }

    /// The EndpointSlices of Service `namespace/name` (of every Service in `namespace` when
    /// `name` is `None`), as a stream of changes that resumes by itself (re-list after 410
    /// Gone, reconnect with backoff after an error).
    pub fn watch_slices(
        &self,
        namespace: &str,
        name: Option<&str>,
    ) -> impl futures_util::Stream<Item = Result<SliceEvent, KubeError>> + Send + 'static {
        use futures_util::StreamExt;
        let api: Api<EndpointSlice> = Api::namespaced(self.0.clone(), namespace);
        let selection = match name {
            Some(name) => watch::Selection {
                labels: Some(format!("{SERVICE_NAME_LABEL}={name}")),
                fields: None,
                page: None,
            },
            // A whole namespace may hold thousands of slices: listed 50 at a time, so the
            // sidecar never holds more than a small page of whole objects at once.
            None => watch::Selection {
                labels: Some(SERVICE_NAME_LABEL.to_string()),
                fields: None,
                page: Some(50),
            },
        };
        watch::watch(api, selection).map(|event| {
            event.map(|event| match event {
                Event::Applied(s) => SliceEvent::Applied(SliceInfo::from_object(&s)),
                Event::Deleted(s) => SliceEvent::Deleted(s.metadata.name.unwrap_or_default()),
                Event::Restarting => SliceEvent::Restarting,
                Event::Listed => SliceEvent::Listed,
            })
        })
    }
}

/// kube's client stack, over HTTP/2 where the API server offers it (it does, by ALPN): every
/// watch and lookup of the sidecar is a stream on one connection, where kube's own HTTP/1.1
/// stack holds a connection (a TLS session, its buffers) per watch. HTTP/2 pings find a dead
/// API server (kube's stack relies on a read timeout per connection). Left out of kube's
/// stack: its retry of 429/503 answers (a lookup that fails is refused and asked again after
/// a second; the watcher has its own backoff) and its tracing layer.
fn http2_client(config: kube::Config) -> Result<kube::Client, KubeError> {
    use kube::client::ConfigExt;
    use std::time::Duration;
    let failed = |e: kube::Error| KubeError::Config(e.to_string());
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // As kube does: only if nothing was installed meanwhile.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let mut tls = config.rustls_client_config().map_err(failed)?;
    tls.alpn_protocols.clear(); // the connector offers h2 and http/1.1
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(failed)?)
        .map_err(tower::BoxError::from)
        .layer(config.extra_headers_layer().map_err(failed)?)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// What changed among the cluster's Services (`Client::watch_all_services`).
#[derive(Debug)]
pub enum ServiceEvent {
    /// A (re-)list begins: the Services listed until `Listed` replace what was known.
    Restarting,
    Applied(ServiceInfo),
    Listed,
    /// Gone, or no longer has a ClusterIP: `(namespace, name)`.
    Deleted((String, String)),
}

/// What changed among a Service's EndpointSlices.
#[derive(Debug)]
pub enum SliceEvent {
    /// A (re-)list begins: the slices listed until `Listed` replace what was known.
    Restarting,
    Applied(SliceInfo),
    Listed,
    Deleted(String),
}

/// A Service, as outbound resolution needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    /// `sessionAffinity: ClientIP`, with its timeout in seconds.
    pub affinity: Option<u32>,
    /// `internalTrafficPolicy: Local`: only endpoints on this node.
    pub node_local: bool,
    /// Its pod selector as a label selector (`app=shop,tier=web`); `None` for a Service
    /// without one (its EndpointSlices are written by someone else).
    pub selector: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub tcp: bool,
}

/// A Service port's `targetPort`: a number, or a name the endpoints' ports resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl ServiceInfo {
    pub fn from_object(s: &Service) -> Option<ServiceInfo> {
        let spec = s.spec.as_ref()?;
        let mut ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                    Some(IntOrString::String(name)) => match name.parse::<u16>() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(name.clone()),
                    },
                };
                Some(ServicePortInfo {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target,
                    tcp: p.protocol.as_deref().unwrap_or("TCP") == "TCP",
                })
            })
            .collect();
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref()?.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                // Kubernetes' default: three hours.
                .unwrap_or(10_800)
        });
        Some(ServiceInfo {
            namespace: s.metadata.namespace.clone()?,
            name: s.metadata.name.clone()?,
            cluster_ips: ips,
            ports,
            affinity,
            node_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            selector: spec.selector.as_ref().filter(|s| !s.is_empty()).map(|s| {
                s.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        })
    }
}

/// One EndpointSlice, compact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub name: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: String,
    /// Port name → number (a Service's named and unnamed ports alike).
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addresses: Vec<IpAddr>,
    /// As kube-proxy reads the conditions: ready (unset: true), serving (unset: ready),
    /// terminating (unset: false).
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    /// The Pod behind it (`targetRef`), when it names one.
    pub pod: Option<PodRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl SliceInfo {
    pub fn from_object(s: &EndpointSlice) -> SliceInfo {
        let ports = s
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let namespace = s.metadata.namespace.clone().unwrap_or_default();
        let endpoints = s
            .endpoints
            .iter()
            .map(|e| {
                let conditions = e.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                EndpointInfo {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    node: e.node_name.clone(),
                    pod: e.target_ref.as_ref().and_then(|r| {
                        (r.kind.as_deref() == Some("Pod")).then(|| PodRef {
                            namespace: r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                            name: r.name.clone().unwrap_or_default(),
                            uid: r.uid.clone().unwrap_or_default(),
                        })
                    }),
                }
            })
            .collect();
        SliceInfo {
            name: s.metadata.name.clone().unwrap_or_default(),
            service: s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned()
                .unwrap_or_default(),
            ports,
            endpoints,
        }
    }
}

/// A Pod, as the sidecar needs it: who it runs as, and whether it has a sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub meshed: bool,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// Succeeded or Failed: its address may be another pod's by now.
    pub finished: bool,
}

impl PodInfo {
    pub fn from_object(p: &Pod) -> Option<PodInfo> {
        let meta = &p.metadata;
        let labelled = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(MESHED_LABEL))
            .is_some_and(|v| v == "true");
        let ambient = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(AMBIENT_ANNOTATION))
            .is_some_and(|v| v == "enabled");
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let ips = status
            .into_iter()
            .flat_map(|s| {
                s.pod_ips
                    .iter()
                    .flatten()
                    .map(|i| i.ip.clone())
                    .chain(s.pod_ip.clone())
            })
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let phase = status.and_then(|s| s.phase.as_deref());
        Some(PodInfo {
            uid: meta.uid.clone().unwrap_or_default(),
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_string()),
            meshed: labelled || ambient,
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
        })
    }
}
