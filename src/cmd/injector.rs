//! Injector: the mutating admission webhook (`l4mesh injector`). Kubernetes sends an
//! `admission.k8s.io/v1` AdmissionReview for each pod created in an opted-in namespace; the
//! answer carries a JSONPatch that makes the pod what `l4mesh inject` would make it (the same
//! code, `inject::inject_object`). HTTPS (rustls), HTTP/1.1 (hyper). Not on the data path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::cmd::inject::{self, Options};

/// Why the injector could not start.
#[derive(Debug, Error)]
pub enum InjectorError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// AdmissionReview bodies are small; anything larger is refused unread.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Serves the webhook on `addr` with the certificate and key in `cert`/`key` (PEM), forever.
pub async fn serve(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    opts: Options,
) -> Result<(), InjectorError> {
    let tls = tls_config(cert, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| InjectorError::Bind { addr, source })?;
    info!(%addr, "l4mesh injector ready");
    let opts = Arc::new(opts);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let (acceptor, opts) = (acceptor.clone(), opts.clone());
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "injector TLS handshake failed"),
                Err(_) => return debug!(%peer, "injector TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| {
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(handle(req, &opts).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, error = %e, "injector connection ended with an error");
            }
        });
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, InjectorError> {
    let certs = crate::identity::read_certs(cert).map_err(|e| InjectorError::Tls(e.to_string()))?;
    let bytes =
        std::fs::read(key).map_err(|e| InjectorError::Tls(format!("{}: {e}", key.display())))?;
    let key = rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| InjectorError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| InjectorError::Tls(format!("{}: no private key", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| InjectorError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

async fn handle(req: Request<hyper::body::Incoming>, opts: &Options) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return respond(StatusCode::NOT_FOUND, json!({"error": "POST /inject"}));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return respond(StatusCode::BAD_REQUEST, review_error("", &e.to_string())),
    };
    let (status, answer) = review(&body, opts);
    respond(status, answer)
}

/// Answers one AdmissionReview (as bytes); pure, so tests can call it directly.
pub fn review(body: &[u8], opts: &Options) -> (StatusCode, Value) {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                review_error("", &format!("not JSON: {e}")),
            )
        }
    };
    let uid = review["request"]["uid"].as_str().unwrap_or("").to_string();
    if review["kind"] != "AdmissionReview" || uid.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            review_error(
                &uid,
                "expected an admission.k8s.io/v1 AdmissionReview with request.uid",
            ),
        );
    }
    let pod = &review["request"]["object"];
    if pod["kind"] != "Pod" {
        return (
            StatusCode::OK,
            allowed(&uid, None, Some("l4mesh injects pods only; not changed")),
        );
    }
    let mut injected: serde_yaml::Value = match serde_yaml::to_value(pod) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, review_error(&uid, &e.to_string())),
    };
    match inject::inject_object(&mut injected, opts) {
        Ok(false) => (StatusCode::OK, allowed(&uid, None, None)),
        Ok(true) => match serde_json::to_value(&injected) {
            Ok(after) => {
                let name = pod["metadata"]["name"]
                    .as_str()
                    .or(pod["metadata"]["generateName"].as_str())
                    .unwrap_or("");
                info!(uid, pod = name, "injected");
                (StatusCode::OK, allowed(&uid, Some(patch(&after)), None))
            }
            Err(e) => (StatusCode::OK, allowed(&uid, None, Some(&e.to_string()))),
        },
        // A pod that cannot carry a sidecar is admitted unchanged, with a warning the user
        // sees (as Istio skips hostNetwork pods).
        Err((_, inject::NotInjected::Unsupported(reason))) => {
            warn!(uid, reason, "not injected");
            let warning = format!("l4mesh: not injected: {reason}");
            (StatusCode::OK, allowed(&uid, None, Some(&warning)))
        }
        // One that asks for something l4mesh cannot read is refused: admitted without its
        // sidecar it would run outside the mesh, and its clients would fall back to plaintext
        // as for any unmeshed server.
        Err((_, inject::NotInjected::Invalid(reason))) => {
            warn!(uid, reason, "refused: cannot be injected as it asks");
            (
                StatusCode::OK,
                denied(&uid, &format!("l4mesh: not injected: {reason}")),
            )
        }
    }
}

/// The JSONPatch that turns the original pod into `after`: its metadata annotations and
/// labels and its spec, replaced whole (`add` replaces an existing member, RFC 6902).
fn patch(after: &Value) -> Vec<Value> {
    vec![
        json!({"op": "add", "path": "/metadata/annotations", "value": after["metadata"]["annotations"]}),
        json!({"op": "add", "path": "/metadata/labels", "value": after["metadata"]["labels"]}),
        json!({"op": "replace", "path": "/spec", "value": after["spec"]}),
    ]
}

fn allowed(uid: &str, patch: Option<Vec<Value>>, warning: Option<&str>) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(p) = patch {
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&p).unwrap_or_default());
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(encoded);
    }
    if let Some(w) = warning {
        response["warnings"] = json!([w]);
    }
    envelope(response)
}

/// A pod refused (its creation fails with `message`).
fn denied(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "message": message},
    }))
}

fn review_error(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 400, "message": format!("l4mesh injector: {message}")},
    }))
}

fn envelope(response: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

fn respond(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}
