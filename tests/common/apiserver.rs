//! A real Kubernetes API server for the tests (issue 24): etcd and kube-apiserver from
//! `KUBEBUILDER_ASSETS` (`tests/kube-assets.sh` finds or unpacks them; `tests/run.sh` sets it),
//! running in a network namespace of their own on the test cluster's bridge, at
//! 198.18.0.250:6443. Objects are created through the API as a controller would (kube-rs, with
//! an administrator's token); sidecars get a kubeconfig with a token of their own, whose RBAC the
//! test chooses. Everything stops and is removed on drop.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{sh, Cluster, Pod};

/// The API server's address on the cluster bridge.
pub const ADDRESS: &str = "198.18.0.250";
/// Tokens the API server knows (`--token-auth-file`): an administrator, a sidecar user whose
/// permissions the test grants (`grant_sidecar`), and a user with none.
pub const ADMIN_TOKEN: &str = "l4mesh-test-admin";
pub const SIDECAR_TOKEN: &str = "l4mesh-test-sidecar";
pub const NOBODY_TOKEN: &str = "l4mesh-test-nobody";

pub struct ApiServer {
    pub netns: String,
    dir: PathBuf,
    /// kube-apiserver flags beyond the minimal start (feature gates, runtime config).
    extra: Vec<String>,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// What the test started beside the API server (a webhook).
    others: Vec<Child>,
    assets: PathBuf,
    pub ca: PathBuf,
}

/// Where the binaries are, or why the test cannot run (a loud SKIPPED, or a failure under
/// L4MESH_REQUIRE_PRIVILEGED=1).
pub fn assets(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("KUBEBUILDER_ASSETS")
        .map(PathBuf::from)
        .filter(|p| p.join("kube-apiserver").exists() && p.join("etcd").exists());
    if found.is_none() {
        let msg = format!(
            "{test}: no kube-apiserver and etcd: set KUBEBUILDER_ASSETS (tests/run.sh does, from tests/kube-assets.sh)"
        );
        if std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("L4MESH_REQUIRE_PRIVILEGED=1 but {msg}");
        }
        eprintln!("\n*** SKIPPED Kubernetes API test {msg} ***\n");
    }
    found
}

impl ApiServer {
    /// Starts etcd and kube-apiserver for cluster `c` and waits until the API is ready.
    pub fn start(c: &Cluster, assets: &Path) -> ApiServer {
        ApiServer::start_with(c, assets, &[])
    }

    /// `start`, with `extra` kube-apiserver flags.
    pub fn start_with(c: &Cluster, assets: &Path, extra: &[&str]) -> ApiServer {
        let netns = format!("{}-api", c.prefix);
        let dir = c.dir.path().join("apiserver");
        fs::create_dir_all(&dir).unwrap();
        sh(&["ip", "netns", "add", &netns]);
        let mut api = ApiServer {
            netns: netns.clone(),
            dir: dir.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            etcd: None,
            apiserver: None,
            others: Vec::new(),
            assets: assets.to_path_buf(),
            ca: dir.join("ca.crt"),
        };
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &c.node, "link", "add", "vapi", "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ]);
        sh(&[
            "ip", "-n", &c.node, "link", "set", "vapi", "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ADDRESS}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        api.certificates();
        fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,1,system:masters\n{SIDECAR_TOKEN},l4mesh-sidecar,2\n{NOBODY_TOKEN},nobody,3\n"
            ),
        )
        .unwrap();
        api.start_etcd();
        api.start_apiserver();
        api
    }

    fn certificates(&self) {
        let d = &self.dir;
        let p = |f: &str| d.join(f).to_str().unwrap().to_string();
        let openssl = |args: &[&str]| {
            let mut all = vec!["openssl"];
            all.extend_from_slice(args);
            sh(&all);
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            "/CN=test-kube-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=kube-apiserver",
        ]);
        fs::write(
            d.join("server.ext"),
            format!("subjectAltName=IP:{ADDRESS},IP:127.0.0.1,DNS:kubernetes.default.svc\n"),
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.crt"),
            "-days",
            "2",
            "-extfile",
            &p("server.ext"),
        ]);
        openssl(&["genrsa", "-out", &p("sa.key"), "2048"]);
        openssl(&["rsa", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")]);
    }

    /// A serving certificate and key for `ip`, from the API server's own CA (which the test
    /// hands to whatever must trust it, as a webhook's caBundle).
    pub fn serving_cert(&self, name: &str, ip: &str) -> (PathBuf, PathBuf) {
        let d = &self.dir;
        let p = |f: String| d.join(f).to_str().unwrap().to_string();
        let (key, csr, crt, ext) = (
            p(format!("{name}.key")),
            p(format!("{name}.csr")),
            p(format!("{name}.crt")),
            p(format!("{name}.ext")),
        );
        sh(&[
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]);
        fs::write(&ext, format!("subjectAltName=IP:{ip}\n")).unwrap();
        sh(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &p("ca.crt".into()),
            "-CAkey",
            &p("ca.key".into()),
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        (PathBuf::from(crt), PathBuf::from(key))
    }

    /// Starts `program args` in the API server's network namespace, stopped on drop; its
    /// output goes to `<name>.log` beside the API server's.
    pub fn spawn_beside(&mut self, name: &str, program: &Path, args: &[&str]) -> PathBuf {
        let log = self.dir.join(format!("{name}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.others.push(child);
        log
    }

    fn spawn(&self, name: &str, args: &[String]) -> Child {
        let log = fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(self.assets.join(name))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"))
    }

    fn start_etcd(&mut self) {
        let data = self.dir.join("etcd-data");
        let args = [
            format!("--data-dir={}", data.display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--name=test".into(),
            "--log-level=warn".into(),
            "--unsafe-no-fsync".into(),
        ];
        self.etcd = Some(self.spawn("etcd", &args));
    }

    fn start_apiserver(&mut self) {
        let p = |f: &str| self.dir.join(f).display().to_string();
        let args = vec![
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!("--bind-address={ADDRESS}"),
            format!("--advertise-address={ADDRESS}"),
            "--secure-port=6443".into(),
            format!("--tls-cert-file={}", p("server.crt")),
            format!("--tls-private-key-file={}", p("server.key")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            // Dual-stack, so that Services can have IPv6 ClusterIPs too.
            "--service-cluster-ip-range=10.96.0.0/12,fd00:96::/108".into(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect::<Vec<_>>();
        self.apiserver = Some(self.spawn("kube-apiserver", &args));
        self.wait_ready();
    }

    /// Waits for `/readyz` (the API server takes a few seconds; etcd is ready sooner).
    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.netns,
                    "curl",
                    "-s",
                    "--max-time",
                    "2",
                    "--cacert",
                ])
                .arg(&self.ca)
                .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                .arg(format!("https://{ADDRESS}:6443/readyz"))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let log =
                    fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default();
                let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
                panic!("kube-apiserver not ready after 60 s; log, last lines first:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the API server (not etcd): what is stored stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the API server again on the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.start_apiserver();
    }

    /// A kubeconfig for `token`, readable by the proxy user; returns its path.
    pub fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let ca = fs::read(&self.ca).unwrap();
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{ADDRESS}:6443\n    certificate-authority-data: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n"
        );
        let path = self.dir.join(format!("{name}.kubeconfig"));
        fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    /// Runs `f` with a client holding the administrator's token (the test acting as a
    /// controller would), on a thread in the API server's own network namespace: not in a
    /// pod, whose sidecar would count the test's own API calls as the pod's traffic.
    pub fn admin<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(kube::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        let path = self.kubeconfig("admin", ADMIN_TOKEN);
        let here = Pod {
            netns: self.netns.clone(),
            ip4: ADDRESS.parse().unwrap(),
            ip6: "::1".parse().unwrap(),
        };
        here.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let file = kube::config::Kubeconfig::read_from(&path).unwrap();
                let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .unwrap();
                f(kube::Client::try_from(config).unwrap()).await
            })
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let others = std::mem::take(&mut self.others);
        for child in others.into_iter().chain(
            [self.apiserver.take(), self.etcd.take()]
                .into_iter()
                .flatten(),
        ) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("{}-logs", self.netns));
            let _ = fs::create_dir_all(&keep);
            for f in ["kube-apiserver.log", "etcd.log"] {
                let _ = fs::copy(self.dir.join(f), keep.join(f));
            }
            eprintln!("API server logs kept in {}", keep.display());
        }
    }
}

/// Objects the tests create, as JSON, through the administrator's client.
pub mod objects {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    use kube::api::{Api, Patch, PatchParams, PostParams};

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// Namespace `ns` with service accounts `sas`.
    pub async fn namespace(client: &kube::Client, ns: &str, sas: &[&str]) {
        let api: Api<Namespace> = Api::all(client.clone());
        api.create(
            &PostParams::default(),
            &from(serde_json::json!({"metadata": {"name": ns}})),
        )
        .await
        .unwrap();
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        for sa in sas {
            api.create(
                &PostParams::default(),
                &from(serde_json::json!({"metadata": {"name": sa}})),
            )
            .await
            .unwrap();
        }
    }

    /// Lets the sidecar user read what discovery reads (the RBAC deploy/ ships).
    pub async fn grant_sidecar(client: &kube::Client) {
        let roles: Api<ClusterRole> = Api::all(client.clone());
        roles
            .create(
                &PostParams::default(),
                &from(serde_json::json!({
                    "metadata": {"name": "l4mesh-sidecar"},
                    "rules": [
                        {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"]},
                        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
                    ]
                })),
            )
            .await
            .unwrap();
        let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
        bindings
            .create(
                &PostParams::default(),
                &from(serde_json::json!({
                    "metadata": {"name": "l4mesh-sidecar"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "l4mesh-sidecar"},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "l4mesh-sidecar"}]
                })),
            )
            .await
            .unwrap();
    }

    /// A Pod object no kubelet runs, with the address a kubelet would report; `meshed` puts
    /// the injector's label on it.
    pub async fn pod(
        client: &kube::Client,
        ns: &str,
        name: &str,
        sa: &str,
        ip: IpAddr,
        meshed: bool,
    ) -> String {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let mut labels = serde_json::json!({"app": name});
        if meshed {
            labels["l4mesh.io/injected"] = "true".into();
        }
        let pod: Pod = from(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "serviceAccountName": sa,
                "automountServiceAccountToken": false,
                "nodeName": "node-1",
                "containers": [{"name": "app", "image": "example.invalid/app"}]
            }
        }));
        let created = api.create(&PostParams::default(), &pod).await.unwrap();
        let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        created.metadata.uid.unwrap()
    }

    /// Puts the injector's label on Pod `name` (the backend joined the mesh).
    pub async fn label_meshed(client: &kube::Client, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let patch = serde_json::json!({"metadata": {"labels": {"l4mesh.io/injected": "true"}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// A selector-less Service (no controller manager here to fill its endpoints); returns
    /// its ClusterIP. `ports`: (name, port, targetPort as JSON: a number or a name).
    pub async fn service(
        client: &kube::Client,
        ns: &str,
        name: &str,
        ports: &[(&str, u16, serde_json::Value)],
        extra: serde_json::Value,
    ) -> IpAddr {
        let api: Api<Service> = Api::namespaced(client.clone(), ns);
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p, t)| serde_json::json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"}))
            .collect();
        let mut spec = serde_json::json!({"ports": ports});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        let svc: Service = from(serde_json::json!({"metadata": {"name": name}, "spec": spec}));
        let created = api.create(&PostParams::default(), &svc).await.unwrap();
        created.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
    }

    /// Replaces Service `name`'s ports (as `service` takes them), as `kubectl edit` would.
    pub async fn service_ports(
        client: &kube::Client,
        ns: &str,
        name: &str,
        ports: &[(&str, u16, serde_json::Value)],
    ) {
        let api: Api<Service> = Api::namespaced(client.clone(), ns);
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p, t)| serde_json::json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"}))
            .collect();
        let patch = serde_json::json!({"spec": {"ports": ports}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Writes Service `service`'s EndpointSlice `slice`: `endpoints` are (pod name, uid, ip,
    /// ready); `ports` (name, number).
    pub async fn slice(
        client: &kube::Client,
        ns: &str,
        service: &str,
        slice: &str,
        ports: &[(&str, u16)],
        endpoints: &[(&str, &str, IpAddr, bool)],
    ) {
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(pod, uid, ip, ready)| {
                serde_json::json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": "node-1",
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod, "uid": uid}
                })
            })
            .collect();
        let ports: Vec<_> = ports
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
            .collect();
        let family = if endpoints.is_empty() {
            "IPv4"
        } else if slice.ends_with("-v6") {
            "IPv6"
        } else {
            "IPv4"
        };
        let object: EndpointSlice = from(serde_json::json!({
            "metadata": {
                "name": slice,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "l4mesh-tests"
                }
            },
            "addressType": family,
            "endpoints": endpoints,
            "ports": ports
        }));
        let params = PatchParams::apply("l4mesh-tests").force();
        api.patch(slice, &params, &Patch::Apply(&object))
            .await
            .unwrap();
    }
}
