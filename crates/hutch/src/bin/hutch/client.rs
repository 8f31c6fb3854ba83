//! The CLI's HTTP client: the unix socket or TCP (TLS for https URLs), whole or streamed
//! request bodies, JSON errors turned into messages, NDJSON streams.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) struct Client {
    pub(crate) data_dir: PathBuf,
    /// host:port and, for https, the TLS client configuration.
    pub(crate) url: Option<(String, Option<Arc<rustls::ClientConfig>>)>,
    pub(crate) token: Option<String>,
}

pub(crate) struct Resp {
    pub(crate) status: StatusCode,
    pub(crate) body: hyper::body::Incoming,
}

/// A request body: whole or streamed.
pub(crate) type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A body streamed from a blocking reader (a file, stdin) after `prefix`: read only as fast as
/// the connection takes it, so nothing is held whole in memory.
pub(crate) fn reader_body(prefix: Bytes, mut r: impl Read + Send + 'static) -> ReqBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    // A thread, not a blocking task: reading stdin may block for ever and must not hold up the
    // runtime's shutdown.
    std::thread::spawn(move || {
        if !prefix.is_empty() && tx.blocking_send(Ok(prefix)).is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|r| (r.map(hyper::body::Frame::data), rx))
    });
    http_body_util::StreamBody::new(s).boxed()
}

pub(crate) fn whole(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

impl Client {
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        ctype: &str,
        body: Bytes,
    ) -> Result<Resp> {
        self.send_body(method, path, ctype, whole(body)).await
    }

    pub(crate) async fn send_body(
        &self,
        method: Method,
        path: &str,
        ctype: &str,
        body: ReqBody,
    ) -> Result<Resp> {
        let (io, host): (Box<dyn IoStream>, String) = match &self.url {
            Some((hostport, tls)) => {
                let s = tokio::net::TcpStream::connect(hostport)
                    .await
                    .with_context(|| format!("cannot reach hutchd at {hostport}"))?;
                match tls {
                    Some(cfg) => {
                        let host = hostport
                            .rsplit_once(':')
                            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                            .unwrap_or(hostport);
                        let name = rustls_pki_types::ServerName::try_from(host.to_string())
                            .with_context(|| format!("{host} is not a valid TLS server name"))?;
                        let s = tokio_rustls::TlsConnector::from(cfg.clone())
                            .connect(name, s)
                            .await
                            .with_context(|| format!("TLS with hutchd at {hostport}"))?;
                        (Box::new(s), hostport.clone())
                    }
                    None => (Box::new(s), hostport.clone()),
                }
            }
            None => {
                let sock = self.data_dir.join("hutchd.sock");
                let s = tokio::net::UnixStream::connect(&sock)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot reach hutchd at {} (is it running? `make run` starts it)",
                            sock.display()
                        )
                    })?;
                (Box::new(s), "hutchd".into())
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, ctype);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender.send_request(req.body(body)?).await?;
        Ok(Resp {
            status: resp.status(),
            body: resp.into_body(),
        })
    }

    /// Sends a request; returns the body bytes, or the API's error message as an error.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Bytes> {
        let b = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
        let r = self.send(method, path, "application/json", b).await?;
        finish(r).await
    }

    pub(crate) async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let b = self.call(method, path, body).await?;
        if b.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&b)?)
    }
}

pub(crate) trait IoStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

/// An error answer from hutchd: its status, `error.code` and `error.message`. Displays as the
/// message; callers that care about the kind of error downcast to it.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiFailure {}

pub(crate) async fn finish(r: Resp) -> Result<Bytes> {
    let status = r.status;
    let body = r.body.collect().await?.to_bytes();
    if status.is_success() {
        return Ok(body);
    }
    let v = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let message = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).to_string());
    let code = v["error"]["code"].as_str().unwrap_or("").to_string();
    Err(ApiFailure {
        status,
        code,
        message,
    }
    .into())
}

pub(crate) fn enc(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// One path segment: like `enc`, and `/` too (a qualified VM name is `account/name`).
pub(crate) fn seg(s: &str) -> String {
    enc(s).replace('/', "%2F")
}

/// Reads an NDJSON response, handing each event to `f` until it returns a result.
pub(crate) async fn ndjson<T>(r: Resp, mut f: impl FnMut(Value) -> Result<Option<T>>) -> Result<T> {
    if !r.status.is_success() {
        finish(r).await?;
        bail!("request failed");
    }
    let mut body = r.body;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if let Some(v) = f(serde_json::from_slice(&line)?)? {
                return Ok(v);
            }
        }
    }
    bail!("connection to hutchd ended early")
}

/// `http://HOST:PORT` or `https://HOST:PORT` (trusting `ca`, else the system's CA bundle;
/// hutchd's own certificate is DATA_DIR/tls/cert.pem).
pub(crate) fn parse_url(
    u: &str,
    ca: Option<&std::path::Path>,
) -> Result<(String, Option<Arc<rustls::ClientConfig>>)> {
    let (tls, rest) = if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = u.strip_prefix("http://") {
        (false, r)
    } else {
        (false, u)
    };
    let hp = rest.trim_end_matches('/').to_string();
    if !tls {
        return Ok((hp, None));
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(p) => {
            use rustls_pki_types::pem::PemObject;
            for c in rustls_pki_types::CertificateDer::pem_file_iter(p)
                .with_context(|| format!("--ca-cert {}", p.display()))?
            {
                roots
                    .add(c.with_context(|| format!("--ca-cert {}", p.display()))?)
                    .with_context(|| format!("--ca-cert {}", p.display()))?;
            }
        }
        None => {
            // The system's CA bundle (Debian/Ubuntu: package ca-certificates).
            let bundle = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
            use rustls_pki_types::pem::PemObject;
            if let Ok(it) = rustls_pki_types::CertificateDer::pem_file_iter(bundle) {
                for c in it.flatten() {
                    let _ = roots.add(c);
                }
            }
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((hp, Some(Arc::new(cfg))))
}
