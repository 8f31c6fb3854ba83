//! End to end through hutchd: the reproduced archive attack (a chain of `../..` symlinks with a
//! file under the last hop, which wrote at the host's `/`) uploaded as an archive body (what
//! accounts may do) and imported by path; a registry manifest naming a traversal digest. Both
//! answer `bad_image`, write nothing outside the data dir and leave no temp or partial files.
//! No VM is booted.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;

fn raw(t: &mut Vec<u8>, kind: u8, name: &str, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    t.extend_from_slice(h.as_bytes());
    t.extend_from_slice(data);
    t.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

/// `d1/d2/up -> ../..`, `d1/d2/up/e0 -> ../..`, ... and a file under the last hop.
fn chain_archive(file: &str) -> Vec<u8> {
    let mut t = Vec::new();
    raw(&mut t, b'5', "d1/", "", b"");
    raw(&mut t, b'5', "d1/d2/", "", b"");
    raw(&mut t, b'2', "d1/d2/up", "../..", b"");
    let mut p = "d1/d2/up".to_string();
    for i in 0..12 {
        p = format!("{p}/e{i}");
        raw(&mut t, b'2', &p, "../..", b"");
    }
    raw(&mut t, b'0', &format!("{p}/{file}"), "", b"pwned");
    t.extend(std::iter::repeat_n(0u8, 1024));
    t
}

fn leftovers(d: &Daemon) -> Vec<String> {
    ["images/tmp", "images/partial"]
        .iter()
        .flat_map(|s| std::fs::read_dir(d.data().join(s)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

#[test]
fn hostile_archives_and_registries_through_hutchd() {
    let d = Daemon::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let name = format!("hutch-e2e-pwned-{}", std::process::id());

    // Uploaded as the request body.
    let (st, body) = d
        .api_raw(
            "POST",
            "/api/v1/images?name=chain",
            Some(&chain_archive(&name)),
            "application/x-tar",
        )
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("bad_image")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("leads outside"),
        "{v}"
    );
    // Imported from a path by the CLI.
    let p = work.path().join("chain.tar");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&chain_archive(&name))
        .unwrap();
    let o = d.hutch(&["image", "import", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("leads outside"));
    assert!(!std::path::Path::new("/").join(&name).exists());
    assert!(!work.path().join(&name).exists());

    // A registry whose manifest names a layer digest with `../` segments and a host path.
    let target = work.path().join("written-by-registry");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", "a".repeat(64)), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": format!("sha256:../../../../../../..{}", target.display()), "size": 5}],
    })
    .to_string();
    let server = std::thread::spawn(move || {
        let mut paths = Vec::new();
        // Answers every connection with the manifest until the pull is over (bounded).
        l.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline && paths.is_empty() {
            let Ok((mut s, _)) = l.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 4096];
            let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
            let first = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            paths.push(first);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n{m}",
                m.len()
            );
        }
        paths
    });
    let (st, body) = d
        .api_raw(
            "POST",
            "/api/v1/images/pull",
            Some(
                json!({"reference": format!("{addr}/evil/app:1"), "insecure": true})
                    .to_string()
                    .as_bytes(),
            ),
            "application/json",
        )
        .unwrap();
    assert_eq!(st, 200);
    let last: Value = String::from_utf8_lossy(&body)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap();
    assert_eq!(last["type"], "error", "{last}");
    assert_eq!(last["code"], "bad_image", "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("invalid digest"),
        "{last}"
    );
    let paths = server.join().unwrap();
    assert!(paths.iter().all(|p| p.contains("/manifests/")), "{paths:?}");
    assert!(!target.exists());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}
