//! Malicious archives and layers, through `ImageStore::import` and `apply_layer`: symlink and
//! hard link chains, absolute links, device nodes, huge GNU/PAX headers, decompression bombs,
//! too many entries, bad digests in archive metadata (hostile sparse maps are in sparse.rs).
//! Oracles: a clear error, the canary and everything outside the store unchanged, nothing at
//! the real `/`, no temp or partial files left, and (for bombs) bounded time.

mod support;

use hutch_image::unpack::{apply_layer, Stats};
use hutch_image::{ImageError, Limits};
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};
use support::{at_host_root, gzip, oci_archive, Host, Tar};

fn unique(tag: &str) -> String {
    format!(
        "hutch-pwned-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// The reproduced attack: `d1/d2/up -> ../..`, then `d1/d2/up/e0 -> ../..`, and so on, with a
/// file under the last hop. Each hop passes a textual check; the kernel would follow them all.
fn chain(t: &mut Tar, hops: usize, file: &str) {
    t.dir("d1/");
    t.dir("d1/d2/");
    t.symlink("d1/d2/up", "../..");
    let mut p = "d1/d2/up".to_string();
    for i in 0..hops {
        p = format!("{p}/e{i}");
        t.symlink(&p, "../..");
    }
    t.file(&format!("{p}/{file}"), b"pwned");
}

fn apply(root: &std::path::Path, layer: &[u8], limits: Limits) -> Result<Stats, ImageError> {
    let mut st = Stats::default();
    apply_layer(root, layer, limits, &mut st).map(|_| st)
}

#[test]
fn symlink_chain_in_an_archive_is_refused() {
    let h = Host::new();
    let name = unique("chain");
    let mut t = Tar::default();
    chain(&mut t, 12, &name);
    let p = h.input("chain.tar", &t.finish());
    let e = h.store.import(&p, Some("chain")).unwrap_err();
    assert!(
        matches!(e, ImageError::BadArchive(ref m) if m.contains("leads outside")),
        "{e}"
    );
    assert!(!at_host_root(&name));
    h.check();
}

#[test]
fn symlink_chain_in_a_layer_stays_inside_the_rootfs() {
    let h = Host::new();
    let name = unique("layerchain");
    let mut t = Tar::default();
    chain(&mut t, 12, &name);
    let layer = t.finish();
    // Applied directly: the file lands at the root of the tree, as it would in the VM.
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    apply(&tree, &layer, Limits::default()).unwrap();
    assert_eq!(std::fs::read(tree.join(&name)).unwrap(), b"pwned");
    std::fs::remove_dir_all(&tree).unwrap();
    // Through import: the image builds, nothing escapes.
    let p = h.input("img.tar", &oci_archive(&[gzip(&layer)], |_| {}));
    let img = h.store.import(&p, None).unwrap();
    assert_eq!(img.name, "hostile:latest");
    assert!(!at_host_root(&name));
    h.check();
}

#[test]
fn absolute_symlinks() {
    let h = Host::new();
    let canary = h.canary().display().to_string();
    // In an archive: refused.
    let mut t = Tar::default();
    t.symlink("x", &canary);
    t.file("x/new", b"x");
    let p = h.input("abs.tar", &t.finish());
    let e = h.store.import(&p, None).unwrap_err();
    assert!(e.to_string().contains("leads outside"), "{e}");
    // A relative one climbing out: refused too.
    let mut t = Tar::default();
    t.symlink("y", "../../../../../../../..");
    t.file("y/tmp/new", b"x");
    let p = h.input("rel.tar", &t.finish());
    assert!(h.store.import(&p, None).is_err());
    // In a layer: taken inside the root.
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    let mut t = Tar::default();
    t.symlink("x", &canary);
    t.file("x/file", b"overwritten?");
    t.dir("x/sub/");
    apply(&tree, &t.finish(), Limits::default()).unwrap();
    let inside = tree.join(canary.trim_start_matches('/'));
    assert_eq!(std::fs::read(inside.join("file")).unwrap(), b"overwritten?");
    std::fs::remove_dir_all(&tree).unwrap();
    h.check();
}

#[test]
fn hardlinks_to_outside_and_chains() {
    let h = Host::new();
    let canary = h.canary().display().to_string();
    for build in [
        |t: &mut Tar, _: &str| t.hardlink("h", "../../canary/file"),
        |t: &mut Tar, _: &str| {
            t.symlink("s", "../../canary");
            t.hardlink("h", "s/file");
        },
        |t: &mut Tar, c: &str| {
            t.symlink("s", c);
            t.hardlink("h", "s/file");
        },
    ] {
        let mut t = Tar::default();
        build(&mut t, &canary);
        let p = h.input("hl.tar", &t.finish());
        assert!(h.store.import(&p, None).is_err());
        let tree = h.path().join("store/tmp/tree");
        std::fs::create_dir(&tree).unwrap();
        let mut t = Tar::default();
        build(&mut t, &canary);
        let e = apply(&tree, &t.finish(), Limits::default()).unwrap_err();
        assert!(matches!(e, ImageError::BadLayer(_)), "{e}");
        std::fs::remove_dir_all(&tree).unwrap();
    }
    // A chain of hard links inside the layer is fine: one inode.
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    let mut t = Tar::default();
    t.file("a", b"data");
    t.hardlink("b", "a");
    t.hardlink("c", "b");
    t.hardlink("d", "/c");
    apply(&tree, &t.finish(), Limits::default()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(tree.join("d")).unwrap().nlink(), 4);
    // A hard link to a directory: refused.
    let mut t = Tar::default();
    t.dir("dd/");
    t.hardlink("e", "dd");
    assert!(apply(&tree, &t.finish(), Limits::default()).is_err());
    std::fs::remove_dir_all(&tree).unwrap();
    h.check();
}

#[test]
fn device_nodes_are_never_made() {
    let h = Host::new();
    let mut layer = Tar::default();
    layer.raw(b'3', b"dev/null", b"", 0, b"");
    layer.raw(b'4', b"dev/sda", b"", 0, b"");
    layer.raw(b'6', b"run/fifo", b"", 0, b"");
    let layer = layer.finish();
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    let st = apply(&tree, &layer, Limits::default()).unwrap();
    assert_eq!(st.skipped_devices, 2);
    for e in walk(&tree) {
        let ft = std::fs::symlink_metadata(&e).unwrap().file_type();
        assert!(!ft.is_char_device() && !ft.is_block_device(), "{e:?}");
    }
    assert!(std::fs::symlink_metadata(tree.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    std::fs::remove_dir_all(&tree).unwrap();
    // Devices in the archive itself are skipped; the image imports.
    let p = h.input(
        "dev.tar",
        &oci_archive(&[gzip(&layer)], |t| t.raw(b'3', b"evil-dev", b"", 0, b"")),
    );
    h.store.import(&p, None).unwrap();
    h.check();
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn huge_gnu_and_pax_headers_are_refused_before_reading() {
    let h = Host::new();
    for (kind, what) in [
        (b'L', "GNU long name"),
        (b'K', "GNU long name"),
        (b'x', "PAX"),
        (b'g', "PAX global"),
    ] {
        // Claims 4 GiB; only one block follows. A reader that trusts the size would try to
        // allocate or read it all.
        let mut t = Tar::default();
        t.raw(kind, b"././@LongLink", b"", 4 << 30, &[b'a'; 512]);
        t.file("after", b"x");
        let bytes = t.finish();
        let start = Instant::now();
        let tree = h.path().join("store/tmp/tree");
        std::fs::create_dir(&tree).unwrap();
        let e = apply(&tree, &bytes, Limits::default()).unwrap_err();
        let want = format!("{what} header of 4294967296 bytes");
        assert!(
            matches!(e, ImageError::Limit(ref m) if m.contains(&want)),
            "{e}"
        );
        std::fs::remove_dir_all(&tree).unwrap();
        let p = h.input("hdr.tar", &bytes);
        let e = h.store.import(&p, None).unwrap_err();
        assert!(matches!(e, ImageError::Limit(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // Headers within the caps work: a long name and xattrs in PAX.
    let mut t = Tar::default();
    let long = format!("{}/f", "d".repeat(200));
    t.raw(
        b'L',
        b"././@LongLink",
        b"",
        long.len() as u64 + 1,
        format!("{long}\0").as_bytes(),
    );
    t.file("ignored-short-name", b"long");
    t.pax(&[("path", b"p/x"), ("SCHILY.xattr.user.k", b"v")]);
    t.file("short", b"pax");
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    apply(&tree, &t.finish(), Limits::default()).unwrap();
    assert_eq!(std::fs::read(tree.join(&long)).unwrap(), b"long");
    assert_eq!(std::fs::read(tree.join("p/x")).unwrap(), b"pax");
    let path = std::ffi::CString::new(tree.join("p/x").to_str().unwrap()).unwrap();
    let mut v = [0u8; 16];
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"user.k".as_ptr(),
            v.as_mut_ptr() as *mut libc::c_void,
            v.len(),
        )
    };
    assert_eq!(&v[..n.max(0) as usize], b"v", "xattr from PAX");
    std::fs::remove_dir_all(&tree).unwrap();
    h.check();
}

/// Bytes of a gzip stream that inflates to a tar holding one file of `n` zero bytes.
fn zero_bomb(n: u64) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut t = Tar::default();
    t.raw(b'0', b"zeros", b"", n, b"");
    e.write_all(&t.0).unwrap();
    let block = vec![0u8; 1 << 20];
    for _ in 0..n >> 20 {
        e.write_all(&block).unwrap();
    }
    e.write_all(&[0u8; 1024]).unwrap();
    e.finish().unwrap()
}

#[test]
fn decompression_bombs_stop_at_the_cap() {
    let bomb = zero_bomb(24 << 20);
    assert!(bomb.len() < 200 << 10, "a bomb is small: {}", bomb.len());
    // As an archive: the archive limit.
    let h = Host::with_limits(Limits {
        max_bytes: 4 << 20,
        ..Limits::default()
    });
    let start = Instant::now();
    let p = h.input("bomb.tar.gz", &bomb);
    let e = h.store.import(&p, None).unwrap_err();
    assert!(
        e.to_string()
            .contains("archive decompresses to more than 4194304"),
        "{e}"
    );
    // As a layer of a well-formed image: the per-layer limit.
    let h2 = Host::with_limits(Limits {
        max_layer_bytes: 4 << 20,
        ..Limits::default()
    });
    let p = h2.input("img.tar", &oci_archive(std::slice::from_ref(&bomb), |_| {}));
    let e = h2.store.import(&p, None).unwrap_err();
    assert!(
        e.to_string()
            .contains("layer decompresses to more than 4194304"),
        "{e}"
    );
    // The decompressed stream is counted, not only file sizes: entries with no data but
    // large (allowed) PAX headers add up.
    let mut t = Tar::default();
    for i in 0..24 {
        t.pax(&[("comment", &vec![b'c'; 900 << 10])]);
        t.file(&format!("f{i}"), b"");
    }
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    let lim = Limits {
        max_bytes: 8 << 20,
        ..Limits::default()
    };
    let e = apply(&tree, &t.finish(), lim).unwrap_err();
    assert!(
        e.to_string()
            .contains("image decompresses to more than 8388608"),
        "{e}"
    );
    std::fs::remove_dir_all(&tree).unwrap();
    assert!(start.elapsed() < Duration::from_secs(30));
    h.check();
    h2.check();
}

#[test]
fn too_many_entries() {
    let lim = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    let h = Host::with_limits(lim);
    let mut t = Tar::default();
    for i in 0..300 {
        t.file(&format!("f{i}"), b"");
    }
    let bytes = t.finish();
    let p = h.input("many.tar", &bytes);
    let e = h.store.import(&p, None).unwrap_err();
    assert!(e.to_string().contains("more than 100 entries"), "{e}");
    let tree = h.path().join("store/tmp/tree");
    std::fs::create_dir(&tree).unwrap();
    let e = apply(&tree, &bytes, lim).unwrap_err();
    assert!(e.to_string().contains("more than 100 entries"), "{e}");
    std::fs::remove_dir_all(&tree).unwrap();
    // Across layers of one image the count adds up.
    let mut t = Tar::default();
    for i in 0..60 {
        t.file(&format!("g{i}"), b"");
    }
    let l = gzip(&t.finish());
    let p = h.input("two.tar", &oci_archive(&[l.clone(), l], |_| {}));
    let e = h.store.import(&p, None).unwrap_err();
    assert!(e.to_string().contains("entries"), "{e}");
    h.check();
}

#[test]
fn bad_digests_and_paths_in_archive_metadata() {
    let h = Host::new();
    for digest in [
        "sha256:../../../../canary/file".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        "sha256:abc".to_string(),
        format!("sha512:{}", "a".repeat(64)),
    ] {
        let mut t = Tar::default();
        t.file(
            "index.json",
            format!(r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":10}}]}}"#).as_bytes(),
        );
        let p = h.input("idx.tar", &t.finish());
        let e = h.store.import(&p, None).unwrap_err();
        assert!(e.to_string().contains("invalid digest"), "{digest}: {e}");
    }
    // docker save: paths in manifest.json are resolved beneath the archive.
    for cfg in ["../../canary/file", "/etc/passwd", "link/file"] {
        let mut t = Tar::default();
        t.symlink("link", "../../canary");
        t.file(
            "manifest.json",
            format!(r#"[{{"Config":"{cfg}","RepoTags":["x:1"],"Layers":[]}}]"#).as_bytes(),
        );
        let p = h.input("save.tar", &t.finish());
        let e = h.store.import(&p, None).unwrap_err();
        assert!(matches!(e, ImageError::BadArchive(_)), "{cfg}: {e}");
    }
    // A descriptor whose size lies about the blob.
    let cfg = support::config_json();
    let m = support::manifest_json((&support::sha(&cfg), cfg.len() + 1), &[]);
    let mut t = Tar::default();
    t.file(
        "index.json",
        format!(r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{}}}]}}"#, support::sha(&m), m.len()).as_bytes(),
    );
    for b in [&cfg, &m] {
        t.file(&format!("blobs/sha256/{}", &support::sha(b)[7..]), b);
    }
    let p = h.input("size.tar", &t.finish());
    let e = h.store.import(&p, None).unwrap_err();
    assert!(e.to_string().contains("descriptor says"), "{e}");
    h.check();
}
