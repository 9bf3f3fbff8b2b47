//! Bad input at start-up: every refusal names the file and the reason, and `l4mesh` exits 64.
//! No privileges needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use l4mesh::cmd::certs::{self, IssueRequest, KeyType};
use l4mesh::identity::{self, CredentialPaths, Expected, TrustDomains};

const BIN: &str = env!("CARGO_BIN_EXE_l4mesh");

struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        Pki::named("test root")
    }

    fn named(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        certs::make_ca(&ca, name, std::time::Duration::from_secs(3600)).unwrap();
        Pki { dir, ca }
    }

    fn issue(&self, name: &str, edit: impl FnOnce(&mut IssueRequest)) -> PathBuf {
        let mut req = IssueRequest::new("cluster.local", "shop", "cart");
        edit(&mut req);
        let out = self.dir.path().join(name);
        certs::issue(&self.ca, &req, &out).unwrap();
        out
    }
}

fn paths(dir: &Path) -> CredentialPaths {
    CredentialPaths {
        cert_chain: dir.join(certs::CERT_CHAIN),
        private_key: dir.join(certs::KEY),
        trust_bundle: dir.join(certs::ROOT_CERT),
        crls: Vec::new(),
    }
}

fn expected() -> Expected {
    Expected {
        trust_domains: "cluster.local".into(),
        namespace: Some("shop".into()),
        service_account: Some("cart".into()),
        id: None,
    }
}

fn load_err(p: &CredentialPaths, e: &Expected) -> String {
    match identity::load(p, e) {
        Ok(c) => panic!("accepted {}", c.id),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, file: &Path, reason: &str) {
    assert!(
        err.contains(&file.display().to_string()),
        "does not name {}: {err}",
        file.display()
    );
    assert!(err.contains(reason), "does not say {reason:?}: {err}");
}

#[test]
fn good_credentials_of_every_key_type_load() {
    let pki = Pki::new();
    let rsa = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa-2048-key.pem");
    type Edit = Box<dyn FnOnce(&mut IssueRequest)>;
    let variants: [(&str, Edit); 3] = [
        ("p256", Box::new(|_| {})),
        ("ed25519", Box::new(|r| r.key_type = KeyType::Ed25519)),
        ("rsa", Box::new(move |r| r.key = Some(rsa))),
    ];
    for (name, edit) in variants {
        let dir = pki.issue(name, edit);
        let creds =
            identity::load(&paths(&dir), &expected()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            creds.id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
    }
}

#[test]
fn key_that_does_not_match_the_certificate() {
    let pki = Pki::new();
    let a = pki.issue("a", |_| {});
    let b = pki.issue("b", |_| {});
    let p = CredentialPaths {
        private_key: b.join(certs::KEY),
        ..paths(&a)
    };
    let err = load_err(&p, &expected());
    assert_names(
        &err,
        &p.private_key,
        "private key does not match the certificate in",
    );
    assert_names(&err, &p.cert_chain, "");
}

#[test]
fn expired_and_not_yet_valid_certificates() {
    let pki = Pki::new();
    let expired = pki.issue("expired", |r| {
        r.not_before_offset = time::Duration::hours(-48);
        r.ttl = time::Duration::hours(-1);
    });
    let p = paths(&expired);
    assert_names(
        &load_err(&p, &expected()),
        &p.cert_chain,
        "certificate expired at",
    );

    let future = pki.issue("future", |r| r.not_before_offset = time::Duration::hours(2));
    let p = paths(&future);
    assert_names(
        &load_err(&p, &expected()),
        &p.cert_chain,
        "certificate is not valid before",
    );
}

#[test]
fn certificate_without_a_spiffe_uri_san() {
    let pki = Pki::new();
    let dir = pki.issue("nospiffe", |_| {});
    // Re-issue the leaf with only a DNS SAN that looks like a principal: it grants nothing.
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ca.join(certs::CA_KEY)).unwrap())
            .unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(pki.ca.join(certs::CA_CERT)).unwrap(),
    )
    .unwrap()
    .self_signed(&ca_key)
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["cluster.local.ns.shop.sa.cart".to_string()]).unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join(certs::CERT_CHAIN), cert.pem()).unwrap();
    std::fs::write(dir.join(certs::KEY), key.serialize_pem()).unwrap();
    let p = paths(&dir);
    assert_names(
        &load_err(&p, &expected()),
        &p.cert_chain,
        "has no spiffe:// URI SAN",
    );
}

#[test]
fn certificate_that_does_not_chain_to_the_bundle() {
    let pki = Pki::new();
    let dir = pki.issue("a", |_| {});
    // Another CA altogether, and an impostor CA with the same name but another key.
    for (other, reason) in [
        (
            Pki::named("another root"),
            "its issuer is not in the trust bundle",
        ),
        (
            Pki::new(),
            "its signature does not verify against the trust bundle",
        ),
    ] {
        let p = CredentialPaths {
            trust_bundle: other.ca.join(certs::CA_CERT),
            ..paths(&dir)
        };
        let err = load_err(&p, &expected());
        assert_names(&err, &p.cert_chain, "does not chain to the trust bundle");
        assert_names(&err, &p.trust_bundle, reason);
    }
}

#[test]
fn a_bundle_with_several_roots_is_accepted() {
    let pki = Pki::new();
    let other = Pki::new();
    let dir = pki.issue("a", |_| {});
    let bundle = dir.join("two-roots.pem");
    let both = std::fs::read_to_string(other.ca.join(certs::CA_CERT)).unwrap()
        + &std::fs::read_to_string(pki.ca.join(certs::CA_CERT)).unwrap();
    std::fs::write(&bundle, both).unwrap();
    let p = CredentialPaths {
        trust_bundle: bundle,
        ..paths(&dir)
    };
    identity::load(&p, &expected()).unwrap();
}

#[test]
fn identity_of_another_trust_domain_or_workload() {
    let pki = Pki::new();
    let dir = pki.issue("td", |r| r.trust_domain = "other.example".into());
    let p = paths(&dir);
    assert_names(
        &load_err(&p, &expected()),
        &p.cert_chain,
        "is not in trust domain cluster.local",
    );
    // Unless that domain is an alias of this one (mid-migration, before the certificate is
    // reissued in the new domain); the message names the aliases when there are some.
    let mut aliased = expected();
    aliased.trust_domains = TrustDomains::new("cluster.local", &["other.example".to_string()]);
    let creds = identity::load(&p, &aliased).expect("a certificate of an alias loads");
    assert_eq!(creds.id.trust_domain(), "other.example");
    aliased.trust_domains = TrustDomains::new("cluster.local", &["third.example".to_string()]);
    assert_names(
        &load_err(&p, &aliased),
        &p.cert_chain,
        "is not in trust domain cluster.local (aliases third.example)",
    );

    let dir = pki.issue("sa", |r| r.service_account = "checkout".into());
    let p = paths(&dir);
    assert_names(
        &load_err(&p, &expected()),
        &p.cert_chain,
        "is not this workload's",
    );
}

#[test]
fn missing_empty_and_truncated_files() {
    let pki = Pki::new();
    let dir = pki.issue("a", |_| {});
    let p = CredentialPaths {
        cert_chain: dir.join("absent.pem"),
        ..paths(&dir)
    };
    assert_names(&load_err(&p, &expected()), &p.cert_chain, "cannot read");

    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let p = CredentialPaths {
        cert_chain: empty.clone(),
        ..paths(&dir)
    };
    assert_names(
        &load_err(&p, &expected()),
        &empty,
        "no PEM certificate found",
    );

    let cert = std::fs::read_to_string(dir.join(certs::CERT_CHAIN)).unwrap();
    let truncated = dir.join("truncated.pem");
    std::fs::write(&truncated, &cert[..cert.len() / 2]).unwrap();
    let p = CredentialPaths {
        cert_chain: truncated.clone(),
        ..paths(&dir)
    };
    let err = load_err(&p, &expected());
    assert!(err.starts_with(&truncated.display().to_string()), "{err}");

    let p = CredentialPaths {
        private_key: dir.join(certs::CERT_CHAIN),
        ..paths(&dir)
    };
    assert_names(
        &load_err(&p, &expected()),
        &p.private_key,
        "no private key found",
    );
}

/// The binary: a bad config names file, line and field and exits 64; so do bad certificates.
#[test]
fn the_command_exits_64_naming_the_problem() {
    let pki = Pki::new();
    let dir = pki.issue("a", |_| {});
    let cfg = dir.join("sidecar.yaml");
    let good = format!(
        "identity:\n  cert_chain: {c}\n  private_key: {k}\n  trust_bundle: {r}\nworkload:\n  namespace: shop\n",
        c = certs::CERT_CHAIN,
        k = certs::KEY,
        r = certs::ROOT_CERT
    );
    std::fs::write(&cfg, &good).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://cluster.local/ns/shop/sa/cart"));

    std::fs::write(&cfg, format!("{good}  serviceAccount: cart\n")).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&format!("{}:7:", cfg.display())), "{err}");
    assert!(
        err.contains("workload: unknown field `serviceAccount`"),
        "{err}"
    );

    // The same file, but the environment says this pod is another workload.
    std::fs::write(&cfg, &good).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("SERVICE_ACCOUNT", "checkout")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("is not this workload's"), "{err}");

    // Injected with Pod Certificates, and the credential bundle is not there: the error says
    // which source was expected and what the cluster probably lacks (issue 30).
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("L4MESH_CERT_CHAIN", dir.join("credential-bundle.pem"))
        .env("L4MESH_PRIVATE_KEY", dir.join("credential-bundle.pem"))
        .env("L4MESH_CERT_SOURCE", "pod-certificate")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("cannot read"), "{err}");
    assert!(err.contains("Kubernetes Pod Certificates"), "{err}");
    assert!(err.contains("PodCertificateRequest=true"), "{err}");
}

/// `l4mesh check` prints, for this workload, the mode of every port and where it came from;
/// a broken policy file is bad input naming the document and field.
#[test]
fn check_prints_the_effective_mode_of_every_port() {
    let pki = Pki::new();
    let dir = pki.issue("a", |_| {});
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.yaml"),
        dir.join("policy.yaml"),
    )
    .unwrap();
    let cfg = dir.join("sidecar.yaml");
    std::fs::write(
        &cfg,
        "identity:\n  cert_chain: cert-chain.pem\n  private_key: key.pem\n  trust_bundle: root-cert.pem\nworkload:\n  labels:\n    app: cart\npolicy:\n  file: policy.yaml\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "port 9102: PERMISSIVE (PeerAuthentication shop/cart, workload portLevelMtls 9102)"
        ),
        "{text}"
    );
    assert!(
        text.contains("other ports: STRICT (PeerAuthentication shop/default, namespace)"),
        "{text}"
    );

    // An ALLOW rule on HTTP methods cannot be checked at L4: check says so.
    let mut with_l7 = std::fs::read_to_string(dir.join("policy.yaml")).unwrap();
    with_l7.push_str("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: get-only\n  namespace: shop\nspec:\n  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n");
    std::fs::write(dir.join("policy.yaml"), with_l7).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("authorization: 1 ALLOW, 0 DENY, 0 AUDIT policies apply"),
        "{text}"
    );
    assert!(
        text.contains("warning: AuthorizationPolicy shop/get-only rules[0]: to[0].operation.methods (HTTP only): not checkable at L4, so this ALLOW rule never matches"),
        "{text}"
    );

    std::fs::write(dir.join("policy.yaml"), "kind: PeerAuthentication\napiVersion: security.istio.io/v1\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  mtls:\n    mode: strict\n").unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("policy.yaml: document 1 (PeerAuthentication shop/p): line 8"),
        "{err}"
    );
    assert!(
        err.contains("spec.mtls.mode: unknown variant `strict`"),
        "{err}"
    );
}

/// A workload certificate issued from an intermediate CA carries the chain and verifies
/// against the root alone; `certs inspect` describes each certificate in the chain.
#[test]
fn intermediate_ca_chains_verify_and_inspect_describes_them() {
    let pki = Pki::new();
    let intermediate = pki.dir.path().join("intermediate");
    certs::make_intermediate(
        &pki.ca,
        &intermediate,
        "test intermediate",
        std::time::Duration::from_secs(3600),
    )
    .unwrap();
    let out = pki.dir.path().join("w");
    certs::issue(
        &intermediate,
        &IssueRequest::new("cluster.local", "shop", "cart"),
        &out,
    )
    .unwrap();
    let creds = identity::load(&paths(&out), &expected()).unwrap();
    assert_eq!(creds.chain.len(), 2, "leaf + intermediate");
    assert_eq!(creds.roots.len(), 1, "the bundle is the root alone");

    let text = Command::new(BIN)
        .args(["certs", "inspect"])
        .arg(out.join(certs::CERT_CHAIN))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("SPIFFE ID:  spiffe://cluster.local/ns/shop/sa/cart"),
        "{text}"
    );
    assert!(text.contains("issuer:     CN=test intermediate"), "{text}");
    assert!(
        text.contains(&format!("serial:     {}", creds.serial)),
        "{text}"
    );
    assert!(text.contains("key type:   ECDSA"), "{text}");
    assert!(
        text.contains("certificate #1") && text.contains("CA:         true"),
        "{text}"
    );
}

/// Habits people bring: `inject -f FILE` as with kubectl and istioctl, `check --help` saying
/// what `--config` is, and a bad flag value exiting 64 like any other bad input.
#[test]
fn the_cli_takes_the_flags_people_type() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/inject/pod.yaml"
    );
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/inject/pod.injected.yaml"
    ))
    .unwrap();
    for flag in ["-f", "--filename"] {
        let out = Command::new(BIN)
            .args(["inject", flag, fixture])
            .output()
            .unwrap();
        assert!(out.status.success(), "{flag}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), golden, "{flag}");
    }
    let help = Command::new(BIN)
        .args(["check", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Sidecar configuration file (YAML)"), "{help}");
    let out = Command::new(BIN)
        .args(["iptables", "print", "--inbound-ports", "80,http"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// config/sidecar.yaml's own instructions work as written (in a copy of the folder), and a
/// missing certificate names the config field, the file and the reason once.
#[test]
fn the_example_configs_instructions_work() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["sidecar.yaml", "policy.yaml"] {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(f);
        std::fs::copy(from, dir.path().join(f)).unwrap();
    }
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["check", "--config", "sidecar.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64));
    let line = std::fs::read_to_string(dir.path().join("sidecar.yaml"))
        .unwrap()
        .lines()
        .position(|l| l.trim_start().starts_with("cert_chain:"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("sidecar.yaml:{line}: identity.cert_chain: ")),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let text = std::fs::read_to_string(dir.path().join("sidecar.yaml")).unwrap();
    for line in text.lines().filter_map(|l| l.strip_prefix("#   l4mesh ")) {
        let args: Vec<&str> = line
            .split_whitespace()
            .map(|a| a.strip_prefix("config/").unwrap_or(a))
            .collect();
        let out = run(&args);
        assert!(out.status.success(), "l4mesh {line}: {out:?}");
    }
    let out = run(&["check", "--config", "sidecar.yaml"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: identity"));
}
