//! The `l4mesh` command: `run` the sidecar, apply the `iptables` capture, mint dev `certs`,
//! `check` a config. Errors from bad input exit 64 with a message naming what is wrong.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use l4mesh::admin::LogControl;
use l4mesh::cmd::{certs, check, explain, inject, injector, iptables, report};
use l4mesh::{app, config::Config};

/// Transparent L4 service-mesh sidecar: iptables capture + mutual TLS with SPIFFE identities.
#[derive(Parser)]
#[command(name = "l4mesh", version)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

/// The workload `check` and `simulate` ask about, over the config's `workload`.
#[derive(clap::Args)]
struct SubjectArgs {
    /// The workload's namespace (default: workload.namespace).
    #[arg(long)]
    namespace: Option<String>,
    /// The workload's service account (default: workload.service_account).
    #[arg(long)]
    service_account: Option<String>,
    /// A pod label, `key=value`, over the config's; repeat for more.
    #[arg(long = "label", value_parser = explain::parse_label)]
    labels: Vec<(String, String)>,
}

impl SubjectArgs {
    fn subject(self) -> explain::Subject {
        explain::Subject {
            namespace: self.namespace,
            service_account: self.service_account,
            labels: self.labels,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar.
    Run {
        /// Sidecar configuration file (YAML); without it, the Kubernetes defaults (the paths
        /// where `l4mesh inject` mounts certificates, policy and pod labels).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Load a configuration and its credentials, report problems, and exit.
    Check {
        /// Sidecar configuration file (YAML); without it, the Kubernetes defaults (the paths
        /// where `l4mesh inject` mounts certificates, policy and pod labels).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Explain the policy file for this workload instead: every resource that applies
        /// and why, every one skipped and why, what cannot be enforced at L4. Needs no
        /// certificate files.
        #[arg(long)]
        explain: bool,
        #[command(flatten)]
        subject: SubjectArgs,
    },
    /// What the sidecar would do with one connection: mode, detection, authorization
    /// decision and the deciding policy and rule. Exit 0 allowed, 1 denied.
    Simulate {
        /// Sidecar configuration file (YAML); without it, the Kubernetes defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The client: its SPIFFE ID (`spiffe://td/ns/NS/sa/SA`, as a mesh peer), or
        /// `plaintext`.
        #[arg(long)]
        from: explain::From,
        /// The client's address.
        #[arg(long)]
        source_ip: std::net::IpAddr,
        /// The port dialled.
        #[arg(long)]
        port: u16,
        /// The pod address dialled (default: workload.pod_ip).
        #[arg(long)]
        destination_ip: Option<std::net::IpAddr>,
        #[command(flatten)]
        subject: SubjectArgs,
        #[arg(long, default_value = "text")]
        output: ReportFormat,
    },
    /// Add l4mesh to Kubernetes workloads: YAML from FILE (or stdin) to stdout.
    Inject {
        /// Input file; `-` or nothing reads stdin.
        #[arg(conflicts_with = "filename")]
        file: Option<PathBuf>,
        /// Input file, as `kubectl -f` and `istioctl kube-inject -f` take it; `-` reads stdin.
        #[arg(short = 'f', long)]
        filename: Option<PathBuf>,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// The mutating admission webhook: injects pods as they are created (HTTPS).
    Injector {
        #[arg(long, default_value = "[::]:9443")]
        listen: std::net::SocketAddr,
        /// Serving certificate (PEM), e.g. from cert-manager.
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Wait until the local sidecar is ready (for a classic sidecar's postStart hook).
    WaitReady {
        #[arg(long, default_value = "http://127.0.0.1:15020/healthz/ready")]
        url: String,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Ask the local sidecar to drain (for preStop hooks).
    Drain {
        #[arg(long, default_value = "http://127.0.0.1:15000/drain")]
        url: String,
    },
    /// Capture rules: apply, remove, or print them.
    #[command(subcommand)]
    Iptables(IptablesCmd),
    /// A throwaway dev PKI: a CA and SPIFFE workload certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Per workload and port: did anything but mTLS arrive lately, from where, and so is
    /// STRICT safe? Reads sidecars' stats endpoints or Prometheus.
    MigrationReport {
        /// A sidecar's admin base URL, e.g. http://127.0.0.1:15000 inside the pod or through
        /// `kubectl port-forward` (repeatable); it is scraped twice, --window apart. A stats
        /// URL (:15020) gives the counts without the non-mTLS source addresses, which only the
        /// loopback-only admin port tells.
        #[arg(long = "sidecar", required_unless_present = "prometheus")]
        sidecars: Vec<String>,
        /// A Prometheus base URL, e.g. http://prometheus:9090; counts over the last --window.
        #[arg(long, conflicts_with = "sidecars")]
        prometheus: Option<String>,
        /// The window: how far back (Prometheus) or how long to watch (sidecars).
        #[arg(long, value_parser = humantime::parse_duration)]
        window: Option<std::time::Duration>,
        /// text or json.
        #[arg(long, default_value = "text")]
        output: ReportFormat,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum IptablesCmd {
    /// Install the capture rules in this network namespace (atomic, idempotent).
    Apply(iptables::Options),
    /// Remove exactly the rules `apply` installed.
    Cleanup(iptables::Options),
    /// Print the rules `apply` would install.
    Print(iptables::Options),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a root CA in DIR (ca-cert.pem, ca-key.pem).
    Ca {
        #[arg(long)]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "l4mesh dev root CA")]
        name: String,
        /// Validity, e.g. 30d, 8760h.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Create an intermediate CA in DIR signed by the CA in --ca (ca-cert.pem, ca-key.pem,
    /// ca-chain.pem, root-cert.pem); certificates issued from it carry the chain.
    Intermediate {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "l4mesh dev intermediate CA")]
        name: String,
        #[arg(long, default_value = "180d", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Write a CRL, signed by the CA in --ca, revoking the certificates in the --revoke files.
    Crl {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        revoke: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print subject, SPIFFE ID, issuer, serial, validity and key type of each certificate.
    Inspect { file: PathBuf },
    /// Issue a workload certificate (cert-chain.pem, key.pem, root-cert.pem) into DIR.
    Issue {
        /// Folder holding the CA made by `certs ca`.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[arg(long, value_enum, default_value = "ecdsa-p256")]
        key_type: certs::KeyType,
        /// Certify this existing PEM private key instead of generating one (e.g. RSA).
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// What `check` says about the policies that apply to this workload.
/// The config file, or the Kubernetes defaults when none is given.
fn load_config(path: Option<&std::path::Path>) -> Result<Config, l4mesh::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Config::kubernetes(),
    }
}

fn read_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
    Ok(s)
}

/// Logs to stderr through a filter that `POST /logging` can change at run time.
fn init_logging(filter: &str) -> Arc<LogControl> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let initial = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("l4mesh: log filter {filter:?}: {e}; using \"info\"");
        EnvFilter::new("info")
    });
    let (filter_layer, handle) = reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .init();
    Arc::new(LogControl::new(filter, move |new| {
        let parsed = EnvFilter::try_new(new).map_err(|e| format!("invalid log filter: {e}"))?;
        handle.reload(parsed).map_err(|e| e.to_string())
    }))
}

/// Exit status for bad input (EX_USAGE), so scripts can tell it from a crash.
const EXIT_BAD_INPUT: u8 = 64;

fn main() -> ExitCode {
    // Bad flags are bad input like a bad config: status 64, not clap's 2 (help and
    // --version still print and exit 0).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log_level.clone());
    let log = init_logging(&filter);
    match dispatch(cli.command, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadInput(e)) => {
            eprintln!("l4mesh: {e:#}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(Failure::Denied) => ExitCode::FAILURE,
        Err(Failure::Other(e)) => {
            eprintln!("l4mesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// The user's input (config, certificates, flags) is wrong.
    BadInput(anyhow::Error),
    /// Something else failed (iptables, bind, ...).
    Other(anyhow::Error),
    /// `simulate`: the connection would be refused (exit 1, nothing on stderr).
    Denied,
}

/// What `inject` and `injector` both take: how the sidecar is added to a pod.
#[derive(clap::Args)]
struct InjectArgs {
    /// The l4mesh container image.
    #[arg(long, default_value = "ghcr.io/l4mesh/l4mesh:0.1.0")]
    image: String,
    /// Run the sidecar as a regular first container that holds the app until ready,
    /// instead of a native sidecar (Kubernetes < 1.29).
    #[arg(long)]
    classic_sidecar: bool,
    /// The ConfigMap holding the mesh policy file.
    #[arg(long, default_value = "l4mesh-policy")]
    policy_configmap: String,
    /// The mesh's trust domain (default cluster.local), e.g. SPIRE's.
    #[arg(long, value_parser = trust_domain)]
    trust_domain: Option<String>,
    /// Another name of the trust domain while migrating to it (repeat for several).
    #[arg(long = "trust-domain-alias", value_parser = trust_domain)]
    trust_domain_aliases: Vec<String>,
    /// Outbound rules every sidecar applies before its own, as a YAML list of
    /// `outbound.rules` entries, e.g. '[{cidrs: [10.96.0.0/12], action: direct}]' for the
    /// Service CIDR.
    #[arg(long, value_parser = outbound_rules)]
    outbound_rules: Option<String>,
}

/// Outbound rules as the sidecar will read them (refused here rather than by every pod).
fn outbound_rules(s: &str) -> Result<String, String> {
    l4mesh::config::parse_outbound_rules(s).map(|_| s.to_string())
}

/// A trust domain as the sidecar's config accepts one (refused here rather than by every pod).
fn trust_domain(s: &str) -> Result<String, String> {
    l4mesh::config::TrustDomain::try_from(s.to_string()).map(String::from)
}

impl InjectArgs {
    fn options(self) -> inject::Options {
        inject::Options {
            image: self.image,
            native_sidecar: !self.classic_sidecar,
            policy_configmap: self.policy_configmap,
            trust_domain: self.trust_domain,
            trust_domain_aliases: self.trust_domain_aliases,
            outbound_rules: self.outbound_rules,
        }
    }
}

/// glibc keeps memory freed by closed connections inside its heaps, so after a burst of
/// thousands of connections a sidecar's RSS would stay at its high-water mark (benches:
/// +12 MiB after 1,000 connections had closed). Handing free pages back to the kernel every
/// 10 s keeps RSS following the connections actually open.
///
/// Because this trims, glibc need not trim on every free: by default it returns the top of a
/// heap as soon as 128 KiB are free there and serves blocks from 128 KiB up with mmap, so a
/// bulk transfer through the tunnel (a 64 KiB buffer handed to HTTP/2 per write, freed once
/// sent) paid page faults on every write (8% of the client sidecar's CPU in a profile).
/// Larger thresholds keep those pages for reuse between trims.
///
/// One arena for every thread: `malloc_trim` hands back the free top of the main heap only,
/// not of the per-thread arenas glibc makes by default (its `mtrim` releases free chunks
/// inside every arena, but an arena's top is no chunk in a bin), so with a worker thread per
/// core each worker's arena kept up to the trim threshold resident after a load (issue 26:
/// a server sidecar 10.6 MiB idle, 27.3 MiB after the load with 2.2 MiB of it in use, two
/// arenas of 8 MiB with 7.3 MiB resident each; with one arena, 16.6 MiB). Small blocks come
/// from each thread's cache without the arena's lock either way.
fn trim_freed_memory_periodically() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called once at start, before the
    // runtime's threads exist.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = l4mesh::metrics::HEAP.set(|| {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it sums
        // every arena under their locks.
        let m = unsafe { libc::mallinfo2() };
        (m.uordblks + m.hblkhd, m.fordblks)
    });
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = std::thread::Builder::new()
        .name("l4mesh-trim".into())
        .stack_size(64 * 1024)
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            // SAFETY: malloc_trim takes no pointers and only returns free pages to the
            // kernel; glibc allows it from any thread at any time.
            unsafe {
                libc::malloc_trim(0);
            }
        });
}

fn bad<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::BadInput(e.into())
}

fn other<E: Into<anyhow::Error>>(e: E) -> Failure {
    Failure::Other(e.into())
}

/// How many threads a subcommand's runtime gets: the sidecar and the webhook serve many
/// connections; the one-shot clients need one.
enum Threads {
    One,
    /// A multi-threaded runtime; `None` is one worker per CPU.
    Workers(Option<std::num::NonZeroUsize>),
}

/// Every tokio runtime of the program is built here. Tasks still running when `future` ends
/// (connections past the drain deadline) are cut without waiting.
fn block_on<F: std::future::Future>(threads: Threads, future: F) -> Result<F::Output, Failure> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Workers(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = n {
                b.worker_threads(n.get());
            }
            b
        }
    };
    let runtime = builder.enable_all().build().map_err(other)?;
    let output = runtime.block_on(future);
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(output)
}

fn dispatch(cmd: Cmd, log: Arc<LogControl>) -> Result<(), Failure> {
    match cmd {
        Cmd::Run { config } => {
            let config = load_config(config.as_deref()).map_err(bad)?;
            let creds = l4mesh::state::credentials::load(&config, None).map_err(|e| {
                // Injected with Pod Certificates and nothing there: the cluster probably lacks
                // what that source needs (issue 30), which "cannot read" alone does not say.
                let from_pod_certificates = std::env::var(inject::ENV_CERT_SOURCE).as_deref()
                    == Ok("pod-certificate");
                match (&e, from_pod_certificates) {
                    (l4mesh::identity::IdentityError::Read { .. }, true) => bad(anyhow::anyhow!(
                        "{e}\nthe credentials were to come from Kubernetes Pod Certificates (l4mesh.io/cert-source: pod-certificate); {}, or no signer has issued for l4mesh.io/cert-signer yet",
                        inject::POD_CERTIFICATE_NEEDS
                    )),
                    _ => bad(e),
                }
            })?;
            let policy = l4mesh::state::policy::load(&config, &creds.id).map_err(bad)?;
            match l4mesh::proxy::socket::raise_fd_limit() {
                Ok(limit) => tracing::debug!(limit, "file descriptor limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the file descriptor limit"),
            }
            trim_freed_memory_periodically();
            let threads = Threads::Workers(config.runtime.worker_threads);
            block_on(threads, app::run(config, creds, policy, log))?.map_err(other)
        }
        Cmd::Check {
            config,
            explain: true,
            subject,
        } => {
            let config = load_config(config.as_deref()).map_err(bad)?;
            let text = explain::explain(&config, &subject.subject()).map_err(bad)?;
            print!("{text}");
            Ok(())
        }
        Cmd::Check {
            config, subject, ..
        } => {
            let mut config = load_config(config.as_deref()).map_err(bad)?;
            // Without this, `check --label app=web` answered for a workload without the label.
            subject.subject().over(&mut config.workload);
            print!("{}", check::check(&config).map_err(bad)?);
            Ok(())
        }
        Cmd::Simulate {
            config,
            from,
            source_ip,
            port,
            destination_ip,
            subject,
            output,
        } => {
            let config = load_config(config.as_deref()).map_err(bad)?;
            let conn = explain::Connection {
                from,
                source_ip,
                port,
                destination_ip,
            };
            let sim = explain::simulate(&config, &subject.subject(), &conn).map_err(bad)?;
            match output {
                ReportFormat::Text => print!("{}", sim.text()),
                ReportFormat::Json => println!("{}", sim.json()),
            }
            if sim.allowed {
                Ok(())
            } else {
                Err(Failure::Denied)
            }
        }
        Cmd::Iptables(IptablesCmd::Apply(args)) => iptables::apply(&args).map_err(other),
        Cmd::Iptables(IptablesCmd::Cleanup(args)) => iptables::cleanup(&args).map_err(other),
        Cmd::Iptables(IptablesCmd::Print(args)) => {
            print!("{}", iptables::print(&args));
            Ok(())
        }
        Cmd::Inject {
            file,
            filename,
            inject,
        } => {
            let input = match file.or(filename).as_deref() {
                None => read_stdin().map_err(bad)?,
                Some(p) if p.as_os_str() == "-" => read_stdin().map_err(bad)?,
                Some(p) => std::fs::read_to_string(p)
                    .with_context(|| p.display().to_string())
                    .map_err(bad)?,
            };
            let output = inject::inject_yaml(&input, &inject.options()).map_err(bad)?;
            print!("{output}");
            // Said as the webhook says it (an admission warning), on stderr.
            if output.contains(inject::ENV_CERT_SOURCE) {
                eprintln!("warning: {}", inject::POD_CERTIFICATE_NEEDS);
            }
            Ok(())
        }
        Cmd::Injector {
            listen,
            tls_cert,
            tls_key,
            inject,
        } => {
            let opts = inject.options();
            let serve = injector::serve(listen, &tls_cert, &tls_key, opts);
            block_on(Threads::Workers(None), serve)?.map_err(other)
        }
        Cmd::WaitReady { url, timeout } => {
            block_on(Threads::One, report::wait_ready(&url, timeout))?
                .map_err(|e| other(anyhow::anyhow!("not ready after {timeout:?}: {e}")))
        }
        Cmd::Drain { url } => {
            let post = report::http_request(hyper::Method::POST, &url);
            block_on(Threads::One, post)?.map(|_| ()).map_err(other)
        }
        Cmd::MigrationReport {
            sidecars,
            prometheus,
            window,
            output,
        } => {
            let gather = report::gather(&sidecars, prometheus.as_deref(), window);
            let (reports, window) = block_on(Threads::One, gather)?.map_err(other)?;
            match output {
                ReportFormat::Text => print!("{}", report::render_text(&reports, window)),
                ReportFormat::Json => println!("{}", report::render_json(&reports, window)),
            }
            Ok(())
        }
        Cmd::Certs(CertsCmd::Intermediate { ca, out, name, ttl }) => {
            certs::make_intermediate(&ca, &out, &name, ttl).map_err(bad)?;
            println!("wrote {}", out.join(certs::CA_CERT).display());
            Ok(())
        }
        Cmd::Certs(CertsCmd::Crl { ca, revoke, out }) => {
            certs::make_crl(&ca, &revoke, &out).map_err(bad)?;
            println!(
                "wrote {} revoking {} certificate(s)",
                out.display(),
                revoke.len()
            );
            Ok(())
        }
        Cmd::Certs(CertsCmd::Inspect { file }) => {
            print!("{}", certs::inspect(&file).map_err(bad)?);
            Ok(())
        }
        Cmd::Certs(CertsCmd::Ca { out, name, ttl }) => {
            certs::make_ca(&out, &name, ttl).map_err(bad)?;
            println!("wrote {}", out.join(certs::CA_CERT).display());
            Ok(())
        }
        Cmd::Certs(CertsCmd::Issue {
            ca,
            namespace,
            service_account,
            trust_domain,
            ttl,
            key_type,
            key,
            out,
        }) => {
            let mut req = certs::IssueRequest::new(&trust_domain, &namespace, &service_account);
            req.ttl =
                time::Duration::try_from(ttl).map_err(|e| bad(anyhow::anyhow!("--ttl: {e}")))?;
            req.key_type = key_type;
            req.key = key;
            certs::issue(&ca, &req, &out).map_err(bad)?;
            println!(
                "wrote {} for spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
                out.join(certs::CERT_CHAIN).display()
            );
            Ok(())
        }
    }
}
