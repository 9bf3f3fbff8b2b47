//! `l4mesh check`: everything `run` does before it binds a listener (config, credentials,
//! policy, TLS configurations), and a description of what it would enforce: the identity, the
//! mTLS mode of each port and which resource set it, the authorization policies that apply.

use thiserror::Error;

use crate::config::Config;
use crate::policy::WorkloadPolicy;
use crate::state;

/// Why the sidecar would not start.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Credentials(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::ConfigError),
}

/// Loads and builds what `run` would, and says what it would enforce.
pub fn check(config: &Config) -> Result<String, CheckError> {
    let creds = state::credentials::load(config, None)?;
    let policy = state::policy::load(config, &creds.id)?;
    let mut out = String::new();
    outln!(
        out,
        "ok: identity {} (certificate serial {}, valid until {})",
        creds.id,
        creds.serial,
        humantime::format_rfc3339_seconds(creds.not_after)
    );
    match &config.policy.file {
        Some(p) => {
            outln!(out, "policy file: {}", p.display());
        }
        None => {
            outln!(out, "policy file: none");
        }
    }
    describe_policy(&policy, &mut out);
    // Building the TLS configurations is the last thing `run` does before binding.
    let ticketer = crate::tls::ticketer()?;
    crate::state::TlsSnapshot::new(config, creds, Some(ticketer), 1)?;
    Ok(out)
}

/// Each port's mode and where it came from (`check` and `check --explain` print it alike).
pub(crate) fn describe_modes(mtls: &crate::policy::EffectiveMtls, out: &mut String) {
    outln!(out, "inbound mTLS mode:");
    for (port, (mode, source)) in &mtls.ports {
        outln!(out, "  port {port}: {mode} ({source})");
    }
    let (mode, source) = &mtls.default;
    let label = if mtls.ports.is_empty() {
        "all ports"
    } else {
        "other ports"
    };
    outln!(out, "  {label}: {mode} ({source})");
}

fn describe_policy(policy: &WorkloadPolicy, out: &mut String) {
    describe_modes(&policy.mtls, out);
    let (allow, deny, audit) = policy.authz.counts();
    let open = if allow == 0 {
        " (no ALLOW policy: every peer not denied is allowed)"
    } else {
        ""
    };
    outln!(
        out,
        "authorization: {allow} ALLOW, {deny} DENY, {audit} AUDIT policies apply{open}"
    );
    for w in policy.warnings() {
        outln!(out, "warning: {w}");
    }
}
