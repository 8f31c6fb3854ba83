//! Sparse files between nodes: what is sent of a sparse file (its data, no zeros), rebuilt
//! byte for byte with its holes; and records a lying or broken peer sends, refused.

use super::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use std::os::unix::fs::MetadataExt;

/// `bytes` cut into pieces of `piece` bytes, as a body.
fn body(
    bytes: Vec<u8>,
    piece: usize,
) -> impl hyper::body::Body<Data = Bytes, Error = std::io::Error> + Unpin {
    let parts: Vec<Result<Frame<Bytes>, std::io::Error>> = bytes
        .chunks(piece.max(1))
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(futures_util::stream::iter(parts))
}

fn record(at: u64, data: &[u8]) -> Vec<u8> {
    let mut r = at.to_be_bytes().to_vec();
    r.extend_from_slice(&(data.len() as u64).to_be_bytes());
    r.extend_from_slice(data);
    r
}

#[tokio::test]
async fn a_sparse_file_goes_as_its_data_and_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mem");
    let f = std::fs::File::create(&src).unwrap();
    let size = 8u64 << 20;
    f.set_len(size).unwrap();
    // Data across a chunk boundary, a little more far on, and zeros written out (not a hole).
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251 + 1) as u8).collect();
    f.write_all_at(&data, 1 << 20).unwrap();
    f.write_all_at(b"tail", (5 << 20) + 3).unwrap();
    f.write_all_at(&vec![0u8; 512 << 10], 3 << 20).unwrap();
    f.sync_all().unwrap();
    let mut sent = Vec::new();
    send_extents(&std::fs::File::open(&src).unwrap(), |b| {
        sent.extend_from_slice(&b);
        true
    })
    .unwrap();
    // Only the data crossed (the chunks it is in), none of the zeros.
    assert!(
        sent.len() < 2 * CHUNK + 4 * HEAD,
        "{} bytes sent",
        sent.len()
    );
    assert!(sent.len() > data.len());
    // Rebuilt from any cut of the records.
    let whole = std::fs::read(&src).unwrap();
    let want = hex::encode(Sha256::digest(&whole));
    for piece in [7, 4096, 1 << 20] {
        let dst = dir.path().join(format!("copy-{piece}"));
        let sha = receive_extents(body(sent.clone(), piece), &dst, size)
            .await
            .unwrap();
        assert_eq!(sha, want);
        assert!(std::fs::read(&dst).unwrap() == whole, "cut in {piece}s");
        let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(used < 2 << 20, "{used} bytes used: holes kept");
    }
    // Through the stream the route serves, too.
    let stream = extents_stream(std::fs::File::open(&src).unwrap());
    let dst = dir.path().join("streamed");
    let sha = receive_extents(
        StreamBody::new(stream.map(|r| r.map(Frame::data))),
        &dst,
        size,
    )
    .await
    .unwrap();
    assert_eq!(sha, want);
    // An empty file and one of holes only: no records.
    let empty = dir.path().join("empty");
    std::fs::File::create(&empty)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut n = 0;
    send_extents(&std::fs::File::open(&empty).unwrap(), |_| {
        n += 1;
        true
    })
    .unwrap();
    assert_eq!(n, 0);
    let sha = receive_extents(body(Vec::new(), 1), &dir.path().join("e2"), 1 << 20)
        .await
        .unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(vec![0u8; 1 << 20])));
}

use futures_util::StreamExt;

#[tokio::test]
async fn records_out_of_line_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    let refused = async |bytes: Vec<u8>, size: u64| {
        receive_extents(body(bytes, 5), &p, size).await.unwrap_err()
    };
    let two = |a: Vec<u8>, b: Vec<u8>| [a, b].concat();
    // Overlapping, going back, empty, past the end, wrapping around, cut short.
    let e = refused(two(record(0, b"abcd"), record(2, b"zz")), 100).await;
    assert!(e.contains("a record of 2 bytes at 2"), "{e}");
    let e = refused(two(record(50, b"abcd"), record(10, b"zz")), 100).await;
    assert!(e.contains("at 10"), "{e}");
    let e = refused(record(0, b""), 100).await;
    assert!(e.contains("a record of 0 bytes"), "{e}");
    let e = refused(record(98, b"abc"), 100).await;
    assert!(e.contains("at 98"), "{e}");
    let mut wrap = record(u64::MAX - 1, b"ab");
    wrap.truncate(HEAD);
    let e = refused(wrap, 100).await;
    assert!(e.contains("at 18446744073709551614"), "{e}");
    let mut short = record(0, b"abcd");
    short.pop();
    let e = refused(short, 100).await;
    assert!(e.contains("cut short"), "{e}");
    let e = refused(record(0, b"abcd")[..10].to_vec(), 100).await;
    assert!(e.contains("cut short"), "{e}");
}
