//! Live state, Kubernetes: what stands behind an address the pod dials, learned from the API
//! on demand (issue 24). A ClusterIP first seen is looked up once (`kube::Client::
//! service_by_cluster_ip`); its Service's EndpointSlices are then watched, all slices merged,
//! until the Service has been unused for `discovery.idle`; its Pods (their service accounts,
//! whether they have a sidecar) are listed by its selector beside the slices' first list, a
//! Pod the list did not have is read by name, and each is kept, refreshed when it is older
//! than `POD_FRESH`. An address that is no Service may be a pod (`pod_by_ip`). Nothing is
//! listed or watched cluster-wide, unless `discovery.services: watch_all` asks for every
//! Service's ClusterIPs to be held (one cluster-wide watch, [`Index`]): a ClusterIP first dialled
//! is then known without a request, and its first connection waits for one round trip (its
//! slices, its Pods beside them), not two.
//!
//! The data path calls [`Services::resolve`] once per connection; it waits only for the first
//! answer about a new address, bounded by `discovery.wait`. When the API fails, what is known
//! stays in force (as kube-proxy keeps its rules), the failure is said once at warn and shown
//! in metrics; an address never answered for is refused, never guessed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What the data path may know of a Pod (it does not import `kube`).
pub use crate::kube::PodInfo;
use crate::kube::{
    Client, EndpointInfo, KubeError, PodRef, ServiceEvent, ServiceInfo, SliceEvent, SliceInfo,
    TargetPort,
};

/// A Pod read from the API is used as is for this long, then read again by the next connection
/// to it (which waits for that read, at most `discovery.wait`, and keeps what is known if the
/// API fails). Long enough that a busy Service costs an API call per endpoint every few
/// seconds; short enough that a backend that joins the mesh (its Pod gets the sidecar label)
/// is tunnelled to within it, never sent plaintext on a stale answer.
const POD_FRESH: Duration = Duration::from_secs(2);
/// An address the API says is neither a Service nor a Pod is asked about again after this.
const OUTSIDE_FRESH: Duration = Duration::from_secs(30);
/// An address the API failed to answer for is asked about again after this: once the API is
/// back, its connections are no longer refused.
const FAILED_FRESH: Duration = Duration::from_secs(1);
/// Addresses remembered at most. A pod dialling ever new addresses (a scan) must not grow the
/// map without bound: past it, answers about addresses outside the cluster are dropped first.
const MAX_ADDRESSES: usize = 16 * 1024;

/// The discovery settings (`discovery.*` in the config).
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a connection to a new address waits for the API's first answer.
    pub wait: Duration,
    /// A Service unused this long is forgotten and its watch closed.
    pub idle: Duration,
    /// This pod's node (`internalTrafficPolicy: Local`); from the downward API.
    pub node: Option<String>,
    /// This workload's namespace: its EndpointSlices say which Services this pod serves
    /// (the destination reporter's `destination_service`).
    pub namespace: String,
    /// `discovery.services: watch_all`: hold every Service's ClusterIPs ([`Index`]).
    pub watch_all: bool,
}

/// What an address turned out to be, for one connection.
#[derive(Debug)]
pub enum Resolved {
    /// Not known to the platform (no API, or neither a Service nor a Pod): decide in band.
    Unknown,
    /// Refused at once: the port is not one the Service defines, it has no ready endpoint, or
    /// the API could not say what the address is.
    Refused { what: String, reason: Refusal },
    /// Where to send it.
    Endpoint(Endpoint),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoSuchPort,
    NoEndpoint,
    Unanswered,
}

impl Refusal {
    /// The `outcome` label of the connection.
    pub fn outcome(self) -> &'static str {
        match self {
            Refusal::NoSuchPort => "service_port",
            Refusal::NoEndpoint => "no_endpoint",
            Refusal::Unanswered => "discovery",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::NoSuchPort => "the Service defines no such port",
            Refusal::NoEndpoint => "the Service has no ready endpoint",
            Refusal::Unanswered => "the Kubernetes API has not said what this address is",
        })
    }
}

/// A chosen backend.
#[derive(Debug)]
pub struct Endpoint {
    /// Where the connection goes: the pod's address and the target port.
    pub addr: SocketAddr,
    /// `<name>.<namespace>.svc.cluster.local`, when reached through a Service.
    pub service: Option<Arc<str>>,
    /// The Pod behind it, when the API named one: whether it has a sidecar, who it runs as.
    pub pod: Option<Arc<PodInfo>>,
    /// Held while the connection is open: counts it against the endpoint, so the next
    /// connection goes to the one with the fewest.
    pub _open: Option<OpenGuard>,
}

/// One open connection to an endpoint.
#[derive(Debug)]
pub struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The Kubernetes source: on-demand lookups and the watches they start.
pub struct Services {
    client: Client,
    settings: Settings,
    inner: Mutex<Inner>,
    metrics: KubeMetrics,
    /// Whether the last API call worked: a failure is said once at warn, then at debug until
    /// it works again.
    healthy: AtomicBool,
    /// The Services this pod serves, from its namespace's EndpointSlices: only slices with one
    /// of this pod's addresses are kept (slice name → what of it concerns this pod).
    own: Mutex<BTreeMap<String, OwnSlice>>,
    own_started: AtomicBool,
    /// With `discovery.services: watch_all`, every Service's ClusterIPs.
    index: Option<Index>,
}

/// Every Service's ClusterIPs, as one cluster-wide watch lists and follows them
/// (`discovery.services: watch_all`): a ClusterIP first dialled is found here, not asked for.
struct Index {
    /// ClusterIP → its Service (a dual-stack Service under both of its addresses).
    by_ip: Mutex<HashMap<IpAddr, Arc<ServiceInfo>>>,
    /// True once the first list is complete: before that, an address not found may yet be a
    /// Service, so a lookup waits (at most `discovery.wait`) rather than call it a pod.
    listed: watch::Sender<bool>,
}

impl Index {
    /// What `ip` is by the index: `Some(None)`, no Service's; `None`, not listed yet within
    /// `wait`.
    async fn service_at(&self, ip: IpAddr, wait: Duration) -> Option<Option<ServiceInfo>> {
        let mut listed = self.listed.subscribe();
        let listed = matches!(
            tokio::time::timeout(wait, listed.wait_for(|l| *l)).await,
            Ok(Ok(_))
        );
        listed.then(|| lock(&self.by_ip).get(&ip).map(|s| (**s).clone()))
    }

    /// Puts `info` under each of its ClusterIPs.
    fn insert(map: &mut HashMap<IpAddr, Arc<ServiceInfo>>, info: &Arc<ServiceInfo>) {
        for ip in &info.cluster_ips {
            map.insert(*ip, info.clone());
        }
    }

    /// Drops Service `namespace/name` from the map.
    fn remove(map: &mut HashMap<IpAddr, Arc<ServiceInfo>>, key: &(String, String)) {
        map.retain(|_, s| s.namespace != key.0 || s.name != key.1);
    }
}

/// What a Service's watch task hears: its slices, or its own spec.
enum Watched {
    Slices(Result<SliceEvent, KubeError>),
    Spec(Result<Option<ServiceInfo>, KubeError>),
}

/// An EndpointSlice that lists this pod: its Service and ports, and which of this pod's
/// addresses it lists.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OwnSlice {
    /// `<name>.<namespace>.svc.cluster.local`
    service: Arc<str>,
    ports: Vec<u16>,
    addresses: Vec<IpAddr>,
}

#[derive(Default)]
struct Inner {
    addresses: HashMap<IpAddr, Arc<Address>>,
    services: HashMap<(String, String), Arc<ServiceState>>,
    pods: HashMap<PodRef, Arc<PodEntry>>,
}

/// An address looked up: the answer, published once the API gave it.
struct Address {
    answer: watch::Sender<Option<Answer>>,
    asked: Instant,
}

#[derive(Clone)]
enum Answer {
    Service(Arc<ServiceState>),
    Pod(Arc<PodInfo>),
    Outside,
    Failed,
}

/// A Service in use: what it is, and its endpoints as the watch has them.
struct ServiceState {
    info: ServiceInfo,
    fqdn: Arc<str>,
    /// The merged EndpointSlices; `None` until the first list.
    slices: watch::Receiver<Option<Arc<BTreeMap<String, SliceInfo>>>>,
    used: Mutex<Instant>,
    /// Open connections per endpoint address.
    open: Mutex<HashMap<IpAddr, Arc<AtomicUsize>>>,
    /// The endpoint chosen last, and until when this pod sticks to it: the affinity timeout
    /// under `sessionAffinity: ClientIP`, else already past (it then only says where the next
    /// tie-break starts, so equal endpoints take turns).
    sticky: Mutex<Option<(IpAddr, Instant)>>,
    /// True once the Service's Pods have been listed (or that failed, or it has no
    /// selector): the first connection waits for it rather than read its endpoint's Pod
    /// after the slices, one more API round trip.
    pods_listed: watch::Receiver<bool>,
    watch: tokio::task::AbortHandle,
}

impl Drop for ServiceState {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

struct PodEntry {
    info: Mutex<Option<(Arc<PodInfo>, Instant)>>,
}

/// Connects to the API as `discovery` says: `off`, none; `on`, or `auto` with somewhere to
/// connect to (`discovery.kubeconfig`, or the pod's service-account token), a client. A
/// client that cannot be built is an error with `on` and a warning with `auto` (the sidecar
/// then works in band, as without the API). Connecting makes no request: an API that is down
/// at start is waited for as when it goes down later.
pub async fn start(
    config: &crate::config::Config,
    namespace: String,
    registry: &Registry,
) -> anyhow::Result<Option<Arc<Services>>> {
    use crate::config::KubernetesMode;
    let discovery = &config.discovery;
    // Not `KUBECONFIG`: a developer's shell pointing at some cluster must not turn a local
    // sidecar's discovery on by itself (`on` does read it).
    let somewhere = discovery.kubeconfig.is_some()
        || std::path::Path::new(crate::config::SERVICE_ACCOUNT_TOKEN).exists();
    match discovery.kubernetes {
        KubernetesMode::Off => return Ok(None),
        KubernetesMode::Auto if !somewhere => {
            debug!(
                "discovery.kubernetes auto: no kubeconfig or service-account token; in band only"
            );
            return Ok(None);
        }
        _ => {}
    }
    let client = match Client::connect(discovery.kubeconfig.as_ref()).await {
        Ok(client) => client,
        Err(e) if discovery.kubernetes == KubernetesMode::On => {
            return Err(anyhow::anyhow!("discovery.kubernetes is on: {e}"))
        }
        Err(e) => {
            warn!(error = %e, "discovery.kubernetes auto: cannot use the Kubernetes API; in band only");
            return Ok(None);
        }
    };
    info!(kubeconfig = ?discovery.kubeconfig, node = ?discovery.node_name, "Kubernetes discovery on");
    let settings = Settings {
        wait: discovery.wait,
        idle: discovery.idle,
        node: discovery.node_name.clone(),
        namespace,
        watch_all: discovery.services == crate::config::ServiceLookup::WatchAll,
    };
    Ok(Some(Services::new(client, settings, registry)))
}

impl Services {
    pub fn new(client: Client, settings: Settings, registry: &Registry) -> Arc<Services> {
        let index = settings.watch_all.then(|| Index {
            by_ip: Mutex::default(),
            listed: watch::channel(false).0,
        });
        let services = Arc::new(Services {
            client,
            settings,
            inner: Mutex::default(),
            metrics: KubeMetrics::new(registry),
            healthy: AtomicBool::new(true),
            own: Mutex::default(),
            own_started: AtomicBool::new(false),
            index,
        });
        if services.index.is_some() {
            services.follow_index();
        }
        // Forget Services nobody used for `idle` (their watches close with them).
        let weak = Arc::downgrade(&services);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(s) => s.sweep(),
                    None => return,
                };
                tokio::time::sleep(every).await;
            }
        });
        services
    }

    /// What `dst` is, and for a Service which endpoint this connection goes to. Waits only for
    /// the first answer about an address, at most `discovery.wait`.
    pub async fn resolve(self: &Arc<Self>, dst: SocketAddr) -> Resolved {
        let started = Instant::now();
        let resolved = self.resolve_now(dst).await;
        let answer = match &resolved {
            Resolved::Endpoint(Endpoint {
                service: Some(_), ..
            }) => 0,
            Resolved::Endpoint(_) => 1,
            Resolved::Unknown => 2,
            Resolved::Refused { .. } => 3,
        };
        self.metrics.resolve[answer].observe(started.elapsed().as_secs_f64());
        resolved
    }

    async fn resolve_now(self: &Arc<Self>, dst: SocketAddr) -> Resolved {
        let answer = match self.answer(dst.ip()).await {
            Some(answer) => answer,
            None => {
                return Resolved::Refused {
                    what: dst.to_string(),
                    reason: Refusal::Unanswered,
                }
            }
        };
        match answer {
            Answer::Outside => Resolved::Unknown,
            Answer::Failed => Resolved::Refused {
                what: dst.to_string(),
                reason: Refusal::Unanswered,
            },
            Answer::Pod(pod) => {
                let pod = self.fresh_pod(&pod_ref(&pod), Some(pod)).await;
                Resolved::Endpoint(Endpoint {
                    addr: dst,
                    service: None,
                    pod,
                    _open: None,
                })
            }
            Answer::Service(service) => self.through(&service, dst).await,
        }
    }

    /// Whether the pod at `ip` (a tunnel client's source address) runs as `peer`, the identity
    /// its certificate names; `Err` says why not. An address the API does not know as a pod,
    /// or cannot say anything of, is refused: a certificate is only good from its own pod.
    pub async fn source_runs_as(
        self: &Arc<Self>,
        ip: IpAddr,
        peer: &crate::identity::SpiffeId,
    ) -> Result<(), String> {
        let pod = match self.answer(ip).await {
            Some(Answer::Pod(pod)) => self.fresh_pod(&pod_ref(&pod), Some(pod)).await,
            Some(Answer::Service(s)) => {
                return Err(format!("{ip} is Service {}'s ClusterIP", s.fqdn))
            }
            Some(Answer::Outside) => return Err(format!("no pod has address {ip}")),
            Some(Answer::Failed) | None => {
                return Err(format!(
                    "the Kubernetes API has not said which pod has {ip}"
                ))
            }
        };
        match pod {
            Some(pod) if peer.runs_as(&pod.namespace, &pod.service_account) => Ok(()),
            Some(pod) => Err(format!(
                "pod {}/{} at {ip} runs as service account {}",
                pod.namespace, pod.name, pod.service_account
            )),
            None => Err(format!("the pod at {ip} is gone")),
        }
    }

    /// The answer for `ip`: known, or asked for now (one request however many connections
    /// wait), waiting at most `discovery.wait`.
    async fn answer(self: &Arc<Self>, ip: IpAddr) -> Option<Answer> {
        let mut rx = {
            let mut inner = lock(&self.inner);
            let stale = inner
                .addresses
                .get(&ip)
                .is_some_and(|a| match &*a.answer.borrow() {
                    Some(Answer::Outside) => a.asked.elapsed() > OUTSIDE_FRESH,
                    Some(Answer::Failed) => a.asked.elapsed() > FAILED_FRESH,
                    _ => false,
                });
            match inner.addresses.get(&ip) {
                Some(a) if !stale => a.answer.subscribe(),
                _ => {
                    if inner.addresses.len() >= MAX_ADDRESSES {
                        inner.addresses.retain(|_, a| {
                            !matches!(&*a.answer.borrow(), Some(Answer::Outside | Answer::Failed))
                        });
                    }
                    let (tx, rx) = watch::channel(None);
                    inner.addresses.insert(
                        ip,
                        Arc::new(Address {
                            answer: tx,
                            asked: Instant::now(),
                        }),
                    );
                    let me = self.clone();
                    tokio::spawn(async move { me.look_up(ip).await });
                    rx
                }
            }
        };
        let answer =
            match tokio::time::timeout(self.settings.wait, rx.wait_for(Option::is_some)).await {
                Ok(Ok(answer)) => answer.clone(),
                _ => None,
            };
        answer
    }

    /// Asks the API what `ip` is (or the index, for whether it is a Service) and publishes the
    /// answer.
    async fn look_up(self: Arc<Self>, ip: IpAddr) {
        // Whether the API was asked (`lookup` counts requests, not answers from the index).
        let mut asked = self.index.is_none();
        let service = match &self.index {
            None => self.client.service_by_cluster_ip(ip).await,
            Some(index) => match index.service_at(ip, self.settings.wait).await {
                Some(service) => Ok(service),
                None => {
                    // The index's own watch says why (its failures are counted and logged);
                    // the address is asked about again after `FAILED_FRESH`.
                    debug!(%ip, "the Services are not listed yet: refused");
                    if let Some(a) = lock(&self.inner).addresses.get(&ip) {
                        a.answer.send_replace(Some(Answer::Failed));
                    }
                    return;
                }
            },
        };
        let answer = match service {
            Ok(Some(info)) => Ok(Answer::Service(self.service(info))),
            Ok(None) => {
                asked = true;
                match self.client.pod_by_ip(ip).await {
                    Ok(Some(pod)) => Ok(Answer::Pod(self.remember_pod(pod))),
                    Ok(None) => Ok(Answer::Outside),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let answer = match answer {
            Ok(answer) => {
                if asked {
                    self.api_ok("lookup");
                }
                answer
            }
            Err(e) => {
                self.api_failed("lookup", &e);
                Answer::Failed
            }
        };
        let what = match &answer {
            Answer::Service(s) => format!("Service {}", s.fqdn),
            Answer::Pod(p) => format!("Pod {}/{}", p.namespace, p.name),
            Answer::Outside => "not in the cluster".into(),
            Answer::Failed => "unknown (API failed)".into(),
        };
        debug!(%ip, %what, "address looked up");
        if let Some(a) = lock(&self.inner).addresses.get(&ip) {
            a.answer.send_replace(Some(answer));
        }
    }

    /// Keeps the index as the cluster-wide watch of Services says, for the sidecar's life. A
    /// re-list replaces it whole once complete; until the first list is complete, lookups wait.
    /// An address answered as outside the cluster (or unanswered) that a Service now has is
    /// forgotten at once, so its next connection finds the Service rather than wait
    /// `OUTSIDE_FRESH`.
    fn follow_index(self: &Arc<Self>) {
        let stream = self.client.watch_all_services();
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listing: Option<HashMap<IpAddr, Arc<ServiceInfo>>> = None;
            while let Some(event) = stream.next().await {
                let Some(me) = me.upgrade() else { return };
                let Some(index) = &me.index else { return };
                let mut new_ips = Vec::new();
                match event {
                    Ok(ServiceEvent::Restarting) => listing = Some(HashMap::new()),
                    Ok(ServiceEvent::Applied(info)) => {
                        let info = Arc::new(info);
                        match listing.as_mut() {
                            // A list names each Service once: nothing to replace, no lock.
                            Some(listing) => Index::insert(listing, &info),
                            None => {
                                // A change: its old addresses go (an edited ClusterIP list).
                                let mut live = lock(&index.by_ip);
                                let key = (info.namespace.clone(), info.name.clone());
                                Index::remove(&mut live, &key);
                                Index::insert(&mut live, &info);
                                new_ips.clone_from(&info.cluster_ips);
                            }
                        }
                    }
                    Ok(ServiceEvent::Deleted(key)) => {
                        let mut live = lock(&index.by_ip);
                        Index::remove(listing.as_mut().unwrap_or(&mut live), &key);
                    }
                    Ok(ServiceEvent::Listed) => {
                        if let Some(map) = listing.take() {
                            new_ips = map.keys().copied().collect();
                            *lock(&index.by_ip) = map;
                            index.listed.send_replace(true);
                        }
                    }
                    Err(e) => {
                        // The watch retries by itself with backoff; what is known stays.
                        me.api_failed("index", &e);
                        continue;
                    }
                }
                me.api_ok("index");
                me.metrics.indexed.set(lock(&index.by_ip).len() as i64);
                if !new_ips.is_empty() {
                    let new_ips: std::collections::HashSet<IpAddr> = new_ips.into_iter().collect();
                    lock(&me.inner).addresses.retain(|ip, a| {
                        !new_ips.contains(ip)
                            || !matches!(
                                &*a.answer.borrow(),
                                Some(Answer::Outside | Answer::Failed)
                            )
                    });
                }
            }
        });
    }

    /// The Service in use with this identity, or a new one whose EndpointSlices are watched
    /// from now on.
    fn service(self: &Arc<Self>, info: ServiceInfo) -> Arc<ServiceState> {
        let key = (info.namespace.clone(), info.name.clone());
        let mut inner = lock(&self.inner);
        if let Some(s) = inner.services.get(&key) {
            if s.info == info {
                return s.clone();
            }
        }
        let (tx, rx) = watch::channel(None);
        // The slices, and the Service itself: a change to its spec (ports, affinity, traffic
        // policy, ClusterIPs) or its deletion must reach new connections as the slices do.
        let slices = self
            .client
            .watch_slices(&info.namespace, Some(&info.name))
            .map(Watched::Slices);
        let spec = self
            .client
            .watch_service(&info.namespace, &info.name)
            .map(Watched::Spec);
        let stream = futures_util::stream::select(slices, spec);
        let known = info.clone();
        let me = Arc::downgrade(self);
        let fqdn = fqdn(&info.name, &info.namespace);
        let name = fqdn.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Slices as last listed or changed (one copy, shared with the connections: copied
            // only when it changes while a connection still reads it); `listing` gathers a
            // re-list until it is done.
            let mut slices: Arc<BTreeMap<String, SliceInfo>> = Arc::default();
            let mut listing: Option<BTreeMap<String, SliceInfo>> = None;
            while let Some(event) = stream.next().await {
                let Some(me) = me.upgrade() else { return };
                let event = match event {
                    Watched::Slices(e) => e,
                    Watched::Spec(Ok(now)) if now.as_ref() != Some(&known) => {
                        // Forgotten: the next connection looks the address up again and
                        // gets the Service as it is now (or nothing, if it is gone).
                        debug!(service = %name, deleted = now.is_none(), "the Service changed");
                        me.forget(&known);
                        return;
                    }
                    Watched::Spec(Ok(_)) => continue,
                    Watched::Spec(Err(e)) => Err(e),
                };
                match event {
                    Ok(SliceEvent::Restarting) => listing = Some(BTreeMap::new()),
                    Ok(SliceEvent::Applied(s)) => {
                        match listing.as_mut() {
                            Some(l) => l.insert(s.name.clone(), s),
                            None => Arc::make_mut(&mut slices).insert(s.name.clone(), s),
                        };
                    }
                    Ok(SliceEvent::Deleted(name)) => {
                        Arc::make_mut(&mut slices).remove(&name);
                    }
                    Ok(SliceEvent::Listed) => {
                        if let Some(l) = listing.take() {
                            slices = Arc::new(l);
                        }
                    }
                    Err(e) => {
                        // The watcher retries by itself with backoff; what is known stays.
                        me.api_failed("watch", &e);
                        continue;
                    }
                }
                me.api_ok("watch");
                if listing.is_none() {
                    let ready: usize = slices
                        .values()
                        .flat_map(|s| &s.endpoints)
                        .filter(|e| e.ready)
                        .count();
                    debug!(service = %name, slices = slices.len(), ready, "endpoints changed");
                    tx.send_replace(Some(slices.clone()));
                }
            }
        });
        let pods_listed = self.list_pods(&info);
        let state = Arc::new(ServiceState {
            info,
            fqdn,
            slices: rx,
            used: Mutex::new(Instant::now()),
            open: Mutex::default(),
            sticky: Mutex::new(None),
            pods_listed,
            watch: task.abort_handle(),
        });
        inner.services.insert(key, state.clone());
        self.metrics.watches.set(inner.services.len() as i64);
        state
    }

    /// Lists the Pods `info` selects, beside the first list of its slices (both in one
    /// round trip), and keeps them as if each had been read; says when that is done.
    fn list_pods(self: &Arc<Self>, info: &ServiceInfo) -> watch::Receiver<bool> {
        let Some(selector) = info.selector.clone() else {
            return watch::channel(true).1;
        };
        let (tx, rx) = watch::channel(false);
        let me = Arc::downgrade(self);
        let namespace = info.namespace.clone();
        tokio::spawn(async move {
            let Some(me) = me.upgrade() else { return };
            match me.client.pods_by_selector(&namespace, &selector).await {
                Ok(pods) => {
                    me.api_ok("pod_list");
                    for pod in pods {
                        me.remember_pod(pod);
                    }
                }
                // Each endpoint's Pod is then read when chosen, as without a selector.
                Err(e) => me.api_failed("pod_list", &e),
            }
            let _ = tx.send(true);
        });
        rx
    }

    /// Drops Service `info` (as it was) and the addresses answered with it.
    fn forget(&self, info: &ServiceInfo) {
        let mut inner = lock(&self.inner);
        let key = (info.namespace.clone(), info.name.clone());
        if inner.services.get(&key).is_some_and(|s| s.info == *info) {
            inner.services.remove(&key);
        }
        inner.addresses.retain(
            |_, a| !matches!(&*a.answer.borrow(), Some(Answer::Service(s)) if s.info == *info),
        );
        self.metrics.watches.set(inner.services.len() as i64);
    }

    /// A connection to `dst`, a ClusterIP of `service`: its port, a ready endpoint, its Pod.
    async fn through(self: &Arc<Self>, service: &Arc<ServiceState>, dst: SocketAddr) -> Resolved {
        *lock(&service.used) = Instant::now();
        let refused = |reason| Resolved::Refused {
            what: format!("{} ({dst})", service.fqdn),
            reason,
        };
        let Some(port) = service
            .info
            .ports
            .iter()
            .find(|p| p.port == dst.port() && p.tcp)
        else {
            return refused(Refusal::NoSuchPort);
        };
        let mut rx = service.slices.clone();
        let slices =
            match tokio::time::timeout(self.settings.wait, rx.wait_for(Option::is_some)).await {
                Ok(Ok(s)) => s.clone().unwrap_or_default(),
                _ => return refused(Refusal::Unanswered),
            };
        let candidates = candidates(
            &slices,
            &port.name,
            &port.target,
            self.settings.node.as_deref(),
            service.info.node_local,
        );
        // No ready endpoint (or none left for this node) is no choice.
        let Some((ip, target, pod)) = self.choose(service, &candidates) else {
            return refused(Refusal::NoEndpoint);
        };
        let open = {
            let mut open = lock(&service.open);
            open.retain(|ip, n| {
                n.load(Ordering::Acquire) > 0 || candidates.iter().any(|c| c.0 == *ip)
            });
            let n = open.entry(ip).or_default().clone();
            n.fetch_add(1, Ordering::AcqRel);
            OpenGuard(n)
        };
        let pod = match pod {
            Some(r) => {
                // Only the first connections wait (and pay for a timer): once listed, never.
                if !*service.pods_listed.borrow() {
                    let mut listed = service.pods_listed.clone();
                    let wait = listed.wait_for(|l| *l);
                    let _ = tokio::time::timeout(self.settings.wait, wait).await;
                }
                self.fresh_pod(r, None).await
            }
            None => None,
        };
        Resolved::Endpoint(Endpoint {
            addr: SocketAddr::new(ip, target),
            service: Some(service.fqdn.clone()),
            pod,
            _open: Some(open),
        })
    }

    /// The endpoint for the next connection: the sticky one under `ClientIP` affinity while
    /// it is still a candidate, else the one with the fewest open connections
    /// ([`least_open`]). `None` only when there is no candidate.
    fn choose<'a>(
        &self,
        service: &ServiceState,
        candidates: &'a [(IpAddr, u16, Option<&'a PodRef>)],
    ) -> Option<(IpAddr, u16, Option<&'a PodRef>)> {
        let now = Instant::now();
        let mut sticky = lock(&service.sticky);
        if let Some((ip, until)) = *sticky {
            if until > now {
                if let Some(c) = candidates.iter().find(|c| c.0 == ip) {
                    if let Some(t) = service.info.affinity {
                        *sticky = Some((ip, now + Duration::from_secs(t.into())));
                    }
                    return Some(*c);
                }
            }
        }
        // One reading of each counter: connections ending meanwhile decrement them without
        // the lock.
        let counts: Vec<(IpAddr, usize)> = {
            let open = lock(&service.open);
            candidates
                .iter()
                .map(|c| (c.0, open.get(&c.0).map_or(0, |n| n.load(Ordering::Acquire))))
                .collect()
        };
        let chosen = candidates[least_open(&counts, sticky.map(|(ip, _)| ip))?];
        let hold = service
            .info
            .affinity
            .map_or(Duration::ZERO, |t| Duration::from_secs(t.into()));
        *sticky = Some((chosen.0, now + hold));
        Some(chosen)
    }

    /// `r`'s Pod: as known if fresh, else read now (bounded; what is known if that fails).
    async fn fresh_pod(
        self: &Arc<Self>,
        r: &PodRef,
        known: Option<Arc<PodInfo>>,
    ) -> Option<Arc<PodInfo>> {
        let entry = {
            let mut inner = lock(&self.inner);
            inner
                .pods
                .entry(r.clone())
                .or_insert_with(|| {
                    Arc::new(PodEntry {
                        info: Mutex::new(known.map(|p| (p, Instant::now()))),
                    })
                })
                .clone()
        };
        let cached = lock(&entry.info).clone();
        match cached {
            Some((pod, at)) if at.elapsed() < POD_FRESH => Some(pod),
            cached => {
                let read = tokio::time::timeout(self.settings.wait, self.read_pod(r, &entry));
                match read.await {
                    Ok(read) => read,
                    Err(_) => cached.map(|(pod, _)| pod),
                }
            }
        }
    }

    async fn read_pod(&self, r: &PodRef, entry: &PodEntry) -> Option<Arc<PodInfo>> {
        match self.client.pod(&r.namespace, &r.name).await {
            Ok(Some(pod)) if r.uid.is_empty() || pod.uid == r.uid => {
                self.api_ok("pod");
                let pod = Arc::new(pod);
                *lock(&entry.info) = Some((pod.clone(), Instant::now()));
                Some(pod)
            }
            // Gone, or another pod of that name now: nothing known about the one in the slice.
            Ok(_) => {
                self.api_ok("pod");
                None
            }
            Err(e) => {
                self.api_failed("pod", &e);
                lock(&entry.info).as_ref().map(|(p, _)| p.clone())
            }
        }
    }

    fn remember_pod(&self, pod: PodInfo) -> Arc<PodInfo> {
        let pod = Arc::new(pod);
        let entry = lock(&self.inner)
            .pods
            .entry(pod_ref(&pod))
            .or_insert_with(|| {
                Arc::new(PodEntry {
                    info: Mutex::new(None),
                })
            })
            .clone();
        *lock(&entry.info) = Some((pod.clone(), Instant::now()));
        pod
    }

    /// Drops Services unused for `idle` (closing their watches), the addresses that led to
    /// them, and Pods no Service or address refers to; returns when to sweep again.
    fn sweep(&self) -> Duration {
        let idle = self.settings.idle;
        let mut inner = lock(&self.inner);
        inner.services.retain(|_, s| lock(&s.used).elapsed() < idle);
        let Inner {
            addresses,
            services,
            pods,
        } = &mut *inner;
        let live = |s: &Arc<ServiceState>| {
            services
                .get(&(s.info.namespace.clone(), s.info.name.clone()))
                .is_some_and(|l| Arc::ptr_eq(l, s))
        };
        addresses.retain(|_, a| match &*a.answer.borrow() {
            Some(Answer::Service(s)) => live(s),
            Some(Answer::Pod(_)) => a.asked.elapsed() < idle,
            _ => a.asked.elapsed() < OUTSIDE_FRESH.max(idle),
        });
        pods.retain(|_, p| {
            lock(&p.info)
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() < idle)
        });
        self.metrics.watches.set(inner.services.len() as i64);
        (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    fn api_ok(&self, request: &'static str) {
        self.metrics
            .requests
            .with_label_values(&[request, "ok"])
            .inc();
        self.metrics.up.set(1);
        if !self.healthy.swap(true, Ordering::AcqRel) {
            info!(request, "the Kubernetes API answers again");
        }
    }

    fn api_failed(&self, request: &'static str, e: &KubeError) {
        self.metrics
            .requests
            .with_label_values(&[request, e.kind()])
            .inc();
        self.metrics.up.set(0);
        if self.healthy.swap(false, Ordering::AcqRel) {
            warn!(request, error = %e, "Kubernetes API failed: keeping what is known; addresses never looked up are refused until it answers");
        } else {
            debug!(request, error = %e, "Kubernetes API still failing");
        }
    }

    /// The Service (`<name>.<namespace>.svc.cluster.local`) a connection to this pod at `dst`
    /// (one of its addresses and a port) came through, as far as the API says: the Service
    /// whose EndpointSlice lists this address with that port (the first by name when several
    /// do, as ztunnel guesses). Only names the API gave are returned, so no peer can add a
    /// label value.
    pub fn serving(self: &Arc<Self>, dst: SocketAddr) -> Option<Arc<str>> {
        // Started by the first connection this pod serves: a pod that only dials out never
        // lists its namespace's slices (the first connections it serves say `unknown` until
        // the list is in).
        if !self.own_started.load(Ordering::Acquire)
            && !self.own_started.swap(true, Ordering::AcqRel)
        {
            self.watch_own_slices();
        }
        let own = lock(&self.own);
        let service = own
            .values()
            .filter(|s| s.addresses.contains(&dst.ip()) && s.ports.contains(&dst.port()))
            .map(|s| &s.service)
            .min()?;
        Some(service.clone())
    }

    /// Watches the EndpointSlices of this pod's namespace, keeping only what lists one of this
    /// pod's addresses (read from its network interfaces: the sidecar shares the pod's
    /// network namespace). One namespace-scoped watch, whatever the workload dials, started
    /// by the first connection the pod serves.
    fn watch_own_slices(self: &Arc<Self>) {
        if self.settings.namespace.is_empty() {
            return;
        }
        let stream = self.client.watch_slices(&self.settings.namespace, None);
        let namespace = self.settings.namespace.clone();
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut listing: Option<BTreeMap<String, OwnSlice>> = None;
            let mut addresses = super::interface_addrs();
            while let Some(event) = stream.next().await {
                let Some(me) = me.upgrade() else { return };
                let mine = |s: &SliceInfo, addresses: &std::collections::HashSet<IpAddr>| {
                    let ips: Vec<IpAddr> = s
                        .endpoints
                        .iter()
                        .flat_map(|e| &e.addresses)
                        .filter(|ip| addresses.contains(ip))
                        .copied()
                        .collect();
                    (!ips.is_empty() && !s.service.is_empty()).then(|| OwnSlice {
                        service: fqdn(&s.service, &namespace),
                        ports: s.ports.values().copied().collect(),
                        addresses: ips,
                    })
                };
                match event {
                    Ok(SliceEvent::Restarting) => {
                        // A re-list: the pod's addresses are read again with it.
                        addresses = super::interface_addrs();
                        listing = Some(BTreeMap::new());
                    }
                    Ok(SliceEvent::Applied(s)) => {
                        let entry = mine(&s, &addresses);
                        match (listing.as_mut(), entry) {
                            (Some(l), Some(e)) => {
                                l.insert(s.name, e);
                            }
                            (Some(_), None) => {}
                            (None, Some(e)) => {
                                lock(&me.own).insert(s.name, e);
                            }
                            (None, None) => {
                                lock(&me.own).remove(&s.name);
                            }
                        }
                    }
                    Ok(SliceEvent::Deleted(name)) => {
                        lock(&me.own).remove(&name);
                    }
                    Ok(SliceEvent::Listed) => {
                        if let Some(l) = listing.take() {
                            debug!(slices = l.len(), "the Services this pod serves");
                            *lock(&me.own) = l;
                        }
                    }
                    Err(e) => {
                        me.api_failed("watch", &e);
                        continue;
                    }
                }
                me.api_ok("watch");
            }
        });
    }

    /// What `/config_dump` shows: the Services in use and their endpoints.
    pub fn view(&self) -> serde_json::Value {
        let inner = lock(&self.inner);
        let services: Vec<serde_json::Value> = inner
            .services
            .values()
            .map(|s| {
                let slices = s.slices.borrow().clone().unwrap_or_default();
                let endpoints: Vec<serde_json::Value> = slices
                    .values()
                    .flat_map(|sl| &sl.endpoints)
                    .map(|e| serde_json::json!({
                        "addresses": e.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "ready": e.ready,
                        "pod": e.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                    }))
                    .collect();
                serde_json::json!({
                    "service": s.fqdn.to_string(),
                    "cluster_ips": s.info.cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "endpoints": endpoints,
                })
            })
            .collect();
        let serving: Vec<serde_json::Value> = lock(&self.own)
            .values()
            .map(|s| {
                serde_json::json!({
                    "service": s.service.to_string(),
                    "ports": s.ports,
                    "addresses": s.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "api_healthy": self.healthy.load(Ordering::Acquire),
            "services": services,
            "serving": serving,
        })
    }
}

/// A Service's name as Istio's labels and reports write it.
fn fqdn(name: &str, namespace: &str) -> Arc<str> {
    format!("{name}.{namespace}.svc.cluster.local").into()
}

fn pod_ref(p: &PodInfo) -> PodRef {
    PodRef {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
    }
}

/// Which of `open` (a candidate's address and its open connections, read once) takes the next
/// connection: the fewest open; among equals, the first in address order after `last`, so
/// equal endpoints take turns. `None` only for no candidate. It works on one snapshot: read
/// twice, the counters (decremented without a lock as connections end) once left no candidate
/// "tied for the fewest", and a sidecar's worker panicked mid-connection (benches/services.rs).
fn least_open(open: &[(IpAddr, usize)], last: Option<IpAddr>) -> Option<usize> {
    let fewest = open.iter().map(|(_, n)| *n).min()?;
    let tied = || (0..open.len()).filter(|i| open[*i].1 == fewest);
    tied()
        .find(|i| last.is_some_and(|l| open[*i].0 > l))
        .or_else(|| tied().next())
}

/// The endpoints a connection to a Service port may go to, with the port number its target
/// resolves to on each slice: ready ones; if none is ready, serving and terminating ones (as
/// kube-proxy falls back); with `node_local`, only this node's. Sorted by address.
fn candidates<'a>(
    slices: &'a BTreeMap<String, SliceInfo>,
    port_name: &str,
    target: &TargetPort,
    node: Option<&str>,
    node_local: bool,
) -> Vec<(IpAddr, u16, Option<&'a PodRef>)> {
    let pick = |want: &dyn Fn(&EndpointInfo) -> bool| {
        let mut v: Vec<_> = slices
            .values()
            .flat_map(|s| {
                // The slice's port of the Service port's name carries the target's number
                // (a named targetPort is resolved per slice, as pods may differ).
                let number = s.ports.get(port_name).copied().or(match target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(_) => None,
                });
                s.endpoints.iter().filter_map(move |e| Some((e, number?)))
            })
            .filter(|(e, _)| want(e))
            .filter(|(e, _)| !node_local || (node.is_some() && e.node.as_deref() == node))
            .flat_map(|(e, port)| e.addresses.first().map(|ip| (*ip, port, e.pod.as_ref())))
            .collect();
        v.sort_by_key(|c| c.0);
        v.dedup_by_key(|c| c.0);
        v
    };
    let ready = pick(&|e| e.ready);
    if !ready.is_empty() {
        return ready;
    }
    pick(&|e| e.serving && e.terminating)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a task panicked mid-update; the map is still whole.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The source's own metrics.
struct KubeMetrics {
    /// API calls by request (`lookup`, `watch`, `pod`, `pod_list`, `index`) and result (`ok`, `forbidden`,
    /// `unreachable`, `config`).
    requests: IntCounterVec,
    /// 1 while the last API call worked.
    up: IntGauge,
    /// Services whose EndpointSlices are watched now.
    watches: IntGauge,
    /// ClusterIPs the cluster-wide index holds (`discovery.services: watch_all`).
    indexed: IntGauge,
    /// How long each connection waited for `resolve`, by what the address was: what the
    /// Kubernetes source adds to a connection (microseconds once known, a round trip or
    /// more for a new address).
    resolve: [prometheus::Histogram; 4],
}

/// `resolve`'s answers, in `KubeMetrics::resolve`'s order.
const RESOLVED: [&str; 4] = ["service", "pod", "outside", "refused"];

impl KubeMetrics {
    fn new(registry: &Registry) -> KubeMetrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "l4mesh_kubernetes_requests_total",
                "Kubernetes API calls by request (lookup, watch, pod, pod_list, index) and result (ok, forbidden, unreachable)",
            ),
            &["request", "result"],
        )
        .expect("static metric");
        let up = IntGauge::new(
            "l4mesh_kubernetes_api_up",
            "1 while the last Kubernetes API call worked; 0: the last known state is in force",
        )
        .expect("static metric");
        let watches = IntGauge::new(
            "l4mesh_kubernetes_watches",
            "Services whose EndpointSlices this sidecar watches now",
        )
        .expect("static metric");
        let indexed = IntGauge::new(
            "l4mesh_kubernetes_indexed_cluster_ips",
            "ClusterIPs held by the cluster-wide index of Services (discovery.services: watch_all; 0 otherwise)",
        )
        .expect("static metric");
        let resolve = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "l4mesh_kubernetes_resolve_seconds",
                "How long a connection waited to learn what its destination is (answer: service, pod, outside, refused)",
            )
            .buckets(vec![
                5e-6, 1e-5, 2.5e-5, 1e-4, 1e-3, 5e-3, 2.5e-2, 0.1, 0.5, 2.5,
            ]),
            &["answer"],
        )
        .expect("static metric");
        up.set(1);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(up.clone()),
            Box::new(watches.clone()),
            Box::new(indexed.clone()),
            Box::new(resolve.clone()),
        ] {
            // A second source on one registry (tests) keeps the first's series.
            let _ = registry.register(c);
        }
        KubeMetrics {
            // Looked up once here: `resolve` is on every outbound connection.
            resolve: RESOLVED.map(|answer| resolve.with_label_values(&[answer])),
            requests,
            up,
            watches,
            indexed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, ready: bool, node: &str) -> EndpointInfo {
        EndpointInfo {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving: ready,
            terminating: false,
            node: Some(node.into()),
            pod: None,
        }
    }

    fn slice(
        name: &str,
        ports: &[(&str, u16)],
        endpoints: Vec<EndpointInfo>,
    ) -> (String, SliceInfo) {
        (
            name.to_string(),
            SliceInfo {
                name: name.into(),
                service: "web".into(),
                ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
                endpoints,
            },
        )
    }

    /// The next connection goes to the endpoint with the fewest open, equals taking turns;
    /// no candidate is no choice, not a panic.
    #[test]
    fn least_open_takes_the_fewest_and_turns_among_equals() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let open = [(a, 1), (b, 0), (c, 0)];
        assert_eq!(least_open(&open, None), Some(1));
        assert_eq!(least_open(&open, Some(b)), Some(2));
        // After the last of the tied ones: back to the first.
        assert_eq!(least_open(&open, Some(c)), Some(1));
        assert_eq!(least_open(&[(a, 3)], Some(a)), Some(0));
        assert_eq!(least_open(&[], None), None);
    }

    /// Which endpoints a Service port may use, as kube-proxy reads the slices.
    #[test]
    fn candidates_merge_slices_resolve_named_ports_and_follow_conditions() {
        let slices: BTreeMap<_, _> = [
            slice(
                "a",
                &[("http", 8080)],
                vec![
                    endpoint("10.0.0.2", true, "n1"),
                    endpoint("10.0.0.3", false, "n1"),
                ],
            ),
            slice(
                "b",
                &[("http", 9090)],
                vec![endpoint("10.0.0.1", true, "n2")],
            ),
        ]
        .into();
        let named = TargetPort::Name("web".into());
        let got = |node_local| {
            candidates(&slices, "http", &named, Some("n1"), node_local)
                .iter()
                .map(|(ip, port, _)| format!("{ip}:{port}"))
                .collect::<Vec<_>>()
        };
        // Both slices, not-ready left out, each slice's own number for the named port.
        assert_eq!(got(false), ["10.0.0.1:9090", "10.0.0.2:8080"]);
        // internalTrafficPolicy: Local.
        assert_eq!(got(true), ["10.0.0.2:8080"]);
        // A port name no slice has, with a named target: nothing to dial.
        assert!(candidates(&slices, "grpc", &named, None, false).is_empty());
        // A numeric target with no port in the slices (selector-less Service made by hand).
        let bare: BTreeMap<_, _> = [slice("c", &[], vec![endpoint("10.0.0.9", true, "n1")])].into();
        let n = candidates(&bare, "", &TargetPort::Number(7000), None, false);
        assert_eq!(n[0].1, 7000);
        // Nothing ready: serving-and-terminating endpoints still take connections.
        let mut draining = endpoint("10.0.0.5", false, "n1");
        draining.serving = true;
        draining.terminating = true;
        let only: BTreeMap<_, _> = [slice(
            "d",
            &[("http", 80)],
            vec![draining, endpoint("10.0.0.6", false, "n1")],
        )]
        .into();
        let c = candidates(&only, "http", &TargetPort::Number(80), None, false);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0.to_string(), "10.0.0.5");
    }
}
