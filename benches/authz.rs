//! What an authorization decision costs with 1,000 AuthorizationPolicies applying to one
//! workload (the policies are compiled once per reload; this measures the per-connection part).
//!
//!     cargo bench --bench authz

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use l4mesh::policy::authz::{AuthorizationPolicy, Authorizer, Peer, Spec};
use l4mesh::policy::Workload;

/// 1,000 policies in namespace `shop`: 600 ALLOW lists of exact principals (indexed), 300 ALLOW
/// rules with wildcards, namespaces and ports (scanned), 100 DENY rules on IP blocks.
fn policies() -> Vec<AuthorizationPolicy> {
    let mut out = Vec::new();
    let mut push = |name: String, spec: String| {
        out.push(AuthorizationPolicy {
            name,
            namespace: "shop".to_string(),
            spec: serde_yaml::from_str::<Spec>(&spec).expect("bench policy parses"),
            dry_run: false,
        })
    };
    for i in 0..600 {
        push(
            format!("allow-{i}"),
            format!("rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/team{i}/sa/a\", \"cluster.local/ns/team{i}/sa/b\"]\n"),
        );
    }
    for i in 0..300 {
        push(
            format!("wild-{i}"),
            format!("rules:\n- from:\n  - source:\n      principals: [\"cluster.local/ns/w{i}/*\"]\n      namespaces: [\"w{i}\"]\n  to:\n  - operation:\n      ports: [\"{}\"]\n", 8000 + i),
        );
    }
    for i in 0..100 {
        push(
            format!("deny-{i}"),
            format!(
                "action: DENY\nrules:\n- from:\n  - source:\n      ipBlocks: [\"10.{i}.0.0/16\"]\n"
            ),
        );
    }
    out
}

fn bench(c: &mut Criterion) {
    let workload = Workload {
        namespace: "shop".to_string(),
        labels: BTreeMap::new(),
        trust_domains: "cluster.local".into(),
    };
    let authorizer = Authorizer::compile(&policies(), &workload, "istio-system");
    let dst: SocketAddr = "10.200.0.9:8080".parse().unwrap();
    let peer = |principal: Option<&'static str>, namespace: Option<&'static str>| Peer {
        principal,
        namespace,
        service_account: principal.and_then(|p| p.split('/').nth(4)),
        source_ip: "10.150.3.4".parse().unwrap(),
        destination: dst,
    };
    let indexed = peer(Some("cluster.local/ns/team599/sa/b"), Some("team599"));
    let scanned = peer(Some("cluster.local/ns/w299/sa/x"), Some("w299"));
    let denied = peer(Some("cluster.local/ns/nobody/sa/x"), Some("nobody"));
    let plaintext = peer(None, None);
    assert!(authorizer.decide(&indexed).decision.is_allowed());
    assert!(!authorizer.decide(&denied).decision.is_allowed());

    let mut g = c.benchmark_group("authz decision, 1000 policies");
    g.bench_function("allowed by an exact principal (hash index)", |b| {
        b.iter(|| authorizer.decide(black_box(&indexed)))
    });
    g.bench_function("allowed by the last wildcard rule (full scan)", |b| {
        let p = Peer {
            destination: "10.200.0.9:8299".parse().unwrap(),
            ..scanned
        };
        assert!(authorizer.decide(&p).decision.is_allowed());
        b.iter(|| authorizer.decide(black_box(&p)))
    });
    g.bench_function("denied: no rule matches (full scan)", |b| {
        b.iter(|| authorizer.decide(black_box(&denied)))
    });
    g.bench_function("plaintext peer (full scan)", |b| {
        b.iter(|| authorizer.decide(black_box(&plaintext)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
