//! TLS material: the admin's certificate files, or a CA hutch generates once and a wildcard leaf
//! it issues from that CA at every start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, PKCS_ECDSA_P256_SHA256,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ProxyError;

/// Where the proxy's TLS certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// A PEM certificate chain (leaf first, normally a `*.<domain>` wildcard) and its PEM key.
    Files { cert: PathBuf, key: PathBuf },
    /// A CA kept in `dir` (`ca.pem`, `ca.key`), generated on first use; a leaf for `*.<domain>`
    /// and `<domain>` is issued from it in memory at each call.
    GeneratedCa { dir: PathBuf },
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const CA_CN: &str = "hutch CA";
/// Largest PEM file read.
const MAX_PEM: u64 = 1 << 20;

/// A rustls server configuration (HTTP/1.1 over TLS 1.2/1.3, ring) for `src`.
pub fn tls_config(src: &TlsSource, domain: &str) -> Result<Arc<ServerConfig>, ProxyError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let (chain, key) = match src {
        TlsSource::Files { cert, key } => load_files(cert, key)?,
        TlsSource::GeneratedCa { dir } => {
            check_domain(&domain)?;
            let ca = load_or_create_ca(dir)?;
            issue_leaf(&ca, &domain)?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The generated CA's certificate (PEM) in `dir`, for clients to trust (`hutch ca`).
/// Does not create one: the daemon does at its first TLS start.
pub fn ca_pem(dir: &Path) -> Result<String, ProxyError> {
    let path = dir.join(CA_CERT);
    let pem = read_bounded(&path)?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| ProxyError::Pem {
        path: path.clone(),
        message: e.to_string(),
    })?;
    String::from_utf8(pem).map_err(|_| ProxyError::Pem {
        path,
        message: "not UTF-8".into(),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ProxyError> {
    use std::io::Read;
    let f = fs::File::open(path).map_err(|e| ProxyError::io("open", path, e))?;
    let mut buf = Vec::new();
    f.take(MAX_PEM + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ProxyError::io("read", path, e))?;
    if buf.len() as u64 > MAX_PEM {
        return Err(ProxyError::Pem {
            path: path.into(),
            message: "file too large".into(),
        });
    }
    Ok(buf)
}

type Material = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_files(cert: &Path, key: &Path) -> Result<Material, ProxyError> {
    let pem = read_bounded(cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProxyError::Pem {
            path: cert.into(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(ProxyError::Pem {
            path: cert.into(),
            message: "no certificate".into(),
        });
    }
    let kpem = read_bounded(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&kpem).map_err(|e| ProxyError::Pem {
        path: key.into(),
        message: e.to_string(),
    })?;
    Ok((chain, key_der))
}

fn check_domain(domain: &str) -> Result<(), ProxyError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ProxyError::Domain(domain.into()))
    }
}

struct Ca {
    cert: CertificateDer<'static>,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn load_or_create_ca(dir: &Path) -> Result<Ca, ProxyError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ProxyError::io("create", dir, e))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let have_cert = cert_path.exists();
    let key = if key_path.exists() {
        let pem = read_bounded(&key_path)?;
        let pem = String::from_utf8(pem).map_err(|_| ProxyError::Pem {
            path: key_path.clone(),
            message: "not UTF-8".into(),
        })?;
        // Whoever can read the CA key can mint certificates for any name the clients check.
        let mode = fs::metadata(&key_path)
            .map_err(|e| ProxyError::io("stat", &key_path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), mode = format!("{mode:o}"), "CA key is readable by others");
        }
        KeyPair::from_pem(&pem)?
    } else if have_cert {
        return Err(ProxyError::CaState {
            dir: dir.into(),
            message: format!(
                "{CA_CERT} exists without {CA_KEY}; refusing to replace a CA clients may trust"
            ),
        });
    } else {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        tracing::info!(dir = %dir.display(), "generated a new proxy CA key");
        key
    };
    if !have_cert {
        // Also the path after a crash between writing the key and the certificate.
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    }
    let pem = read_bounded(&cert_path)?;
    let cert = CertificateDer::from_pem_slice(&pem).map_err(|e| ProxyError::Pem {
        path: cert_path.clone(),
        message: e.to_string(),
    })?;
    // The certificate must carry this key's public key, or leaves would not chain to it.
    if !contains(cert.as_ref(), key.der_bytes()) {
        return Err(ProxyError::CaState {
            dir: dir.into(),
            message: format!("{CA_CERT} does not match {CA_KEY}"),
        });
    }
    Ok(Ca { cert, key })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn issue_leaf(ca: &Ca, domain: &str) -> Result<Material, ProxyError> {
    let mut params = CertificateParams::new(vec![format!("*.{domain}"), domain.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, domain);
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // The issuer is rebuilt from the same name and key as the stored CA certificate, which is
    // all a signature and the issuer name/authority key id of the leaf depend on.
    let issuer = Issuer::new(ca_params(), &ca.key);
    let leaf = params.signed_by(&key, &issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![leaf.der().clone(), ca.cert.clone()], key_der))
}

/// Writes `data` to `path` through a temporary file in the same directory: write, fsync, rename,
/// fsync the directory. The file is created with `mode`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ProxyError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| ProxyError::io("create", &tmp, e))?;
    let res = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| ProxyError::io("write", &tmp, e))
        .and_then(|_| fs::rename(&tmp, path).map_err(|e| ProxyError::io("rename", path, e)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
        return res;
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ProxyError::io("fsync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_with_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ca");
        tls_config(&TlsSource::GeneratedCa { dir: d.clone() }, "hutch.test").unwrap();
        let pem1 = ca_pem(&d).unwrap();
        let mode = fs::metadata(d.join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        tls_config(&TlsSource::GeneratedCa { dir: d.clone() }, "hutch.test").unwrap();
        assert_eq!(ca_pem(&d).unwrap(), pem1, "CA reused");
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn cert_without_key_is_refused_and_key_without_cert_is_completed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        tls_config(&TlsSource::GeneratedCa { dir: d.clone() }, "hutch.test").unwrap();
        let key = fs::read(d.join(CA_KEY)).unwrap();
        fs::remove_file(d.join(CA_CERT)).unwrap();
        tls_config(&TlsSource::GeneratedCa { dir: d.clone() }, "hutch.test").unwrap();
        assert_eq!(fs::read(d.join(CA_KEY)).unwrap(), key, "key kept");
        assert!(ca_pem(&d).is_ok());
        fs::remove_file(d.join(CA_KEY)).unwrap();
        let err = tls_config(&TlsSource::GeneratedCa { dir: d.clone() }, "hutch.test");
        assert!(matches!(err, Err(ProxyError::CaState { .. })), "{err:?}");
    }

    #[test]
    fn mismatched_cert_and_bad_inputs() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            tls_config(&TlsSource::GeneratedCa { dir: d.into() }, "hutch.test").unwrap();
        }
        fs::copy(b.path().join(CA_CERT), a.path().join(CA_CERT)).unwrap();
        let err = tls_config(
            &TlsSource::GeneratedCa {
                dir: a.path().into(),
            },
            "hutch.test",
        );
        assert!(matches!(err, Err(ProxyError::CaState { .. })), "{err:?}");
        let err = tls_config(
            &TlsSource::GeneratedCa {
                dir: b.path().into(),
            },
            "bad domain",
        );
        assert!(matches!(err, Err(ProxyError::Domain(_))), "{err:?}");
        fs::write(a.path().join("junk.pem"), "not pem").unwrap();
        let err = tls_config(
            &TlsSource::Files {
                cert: a.path().join("junk.pem"),
                key: a.path().join("junk.pem"),
            },
            "hutch.test",
        );
        assert!(matches!(err, Err(ProxyError::Pem { .. })), "{err:?}");
        let err = ca_pem(&a.path().join("missing"));
        assert!(matches!(err, Err(ProxyError::Io { .. })), "{err:?}");
    }
}
