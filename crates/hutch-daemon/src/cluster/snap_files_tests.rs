//! A node receiving snapshot files from a peer that lies: about which files there are, their
//! sizes or their bytes. Nothing it sends is kept unless it is exactly what it announced.

use super::*;
use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use std::os::unix::fs::MetadataExt;

fn snap() -> Snapshot {
    serde_json::from_value(serde_json::json!({
        "id": "s1", "name": "base", "vm": "web", "vm_id": "v1", "created_at": 0,
        "image": "busybox", "image_digest": "sha256:00", "vcpus": 1, "mem_mib": 64,
        "disk_gib": 1, "ram_in_file": true, "layers": ["l1"], "bytes": 0
    }))
    .unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn file(name: &str, body: &[u8]) -> SnapFile {
    SnapFile {
        name: name.into(),
        size: body.len() as u64,
        sha256: sha(body),
    }
}

#[test]
fn a_manifest_names_exactly_the_snapshots_files() {
    let s = snap();
    let wanted: Vec<(String, PathBuf)> = ["state", "mem", "layer-l1"]
        .iter()
        .map(|n| (n.to_string(), PathBuf::from(n)))
        .collect();
    let honest = vec![
        file("state", b"st"),
        file("mem", b"m"),
        file("layer-l1", b"l"),
    ];
    let fits = |files: Vec<SnapFile>| {
        let man = SnapManifest {
            files,
            rootfs_sha256: sha(b"root"),
        };
        manifest_fits(&man, &wanted, &s)
    };
    assert!(fits(honest.clone()));
    let mut extra = honest.clone();
    extra.push(file("../../etc/passwd", b"x"));
    assert!(!fits(extra), "a file the snapshot does not have");
    let mut twice = honest.clone();
    twice[2] = file("mem", b"m");
    assert!(!fits(twice), "a file named twice (and one left out)");
    assert!(!fits(honest[..2].to_vec()), "a file left out");
    let mut huge = honest.clone();
    huge[1].size = (64 << 20) + (64 << 20) + 1;
    assert!(
        !fits(huge),
        "a memory file larger than the VM's memory allows"
    );
    let mut big_layer = honest.clone();
    big_layer[2].size = (1 << 30) + (256 << 20) + 1;
    assert!(!fits(big_layer), "a layer larger than the VM's disk allows");
    let mut not_hex = honest;
    not_hex[0].sha256 = "z".repeat(64);
    assert!(!fits(not_hex), "a hash that is not one");
}

/// A body sent in chunks, as a peer streams it.
fn chunks(
    parts: Vec<Vec<u8>>,
) -> impl hyper::body::Body<Data = Bytes, Error = std::io::Error> + Unpin {
    let frames = parts
        .into_iter()
        .map(|p| Ok::<_, std::io::Error>(Frame::data(Bytes::from(p))));
    StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test]
async fn what_a_peer_sends_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mem");
    // Honest: 4 MiB of zeros around a little data, in chunks; kept, the zeros as holes.
    let mut body = vec![0u8; 4 << 20];
    body[2 << 20] = 7;
    let parts: Vec<Vec<u8>> = body.chunks(64 << 10).map(<[u8]>::to_vec).collect();
    receive_file(chunks(parts), false, &p, &file("mem", &body))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), body);
    let used = std::fs::metadata(&p).unwrap().blocks() * 512;
    assert!(used < 1 << 20, "zeros written as holes ({used} bytes used)");

    // The bytes differ from what the hash says.
    let mut f = file("mem", b"hello");
    let e = receive_file(Full::new(Bytes::from_static(b"hellp")), false, &p, &f)
        .await
        .unwrap_err();
    assert!(e.contains("does not hash"), "{e}");
    // More than announced: refused at the first byte too many, not read on.
    let e = receive_file(
        chunks(vec![b"hello".to_vec(), vec![b'!'; 1 << 20]]),
        false,
        &p,
        &f,
    )
    .await
    .unwrap_err();
    assert!(e.contains("more than the 5 bytes"), "{e}");
    // Fewer than announced (the peer hung up early).
    f.size = 6;
    let e = receive_file(Full::new(Bytes::from_static(b"hello")), false, &p, &f)
        .await
        .unwrap_err();
    assert!(e.contains("5 bytes of the 6"), "{e}");
    // A stream that fails partway.
    let failing = StreamBody::new(futures_util::stream::iter(vec![
        Ok(Frame::data(Bytes::from_static(b"hel"))),
        Err(std::io::Error::other("connection reset")),
    ]));
    let e = receive_file(failing, false, &p, &file("mem", b"hello"))
        .await
        .unwrap_err();
    assert!(e.contains("connection reset"), "{e}");
}
