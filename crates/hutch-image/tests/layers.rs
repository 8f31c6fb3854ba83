//! Layer application against crafted tarballs.

use hutch_image::unpack::{apply_layer, Limits, Stats};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u32, u32),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Dev(&'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                h.set_size(0);
                raw_name(&mut h, p);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::File(p, data, m) | E::Owned(p, data, m, _) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_size(data.len() as u64);
                if let E::Owned(_, _, _, id) = e {
                    h.set_uid(*id as u64);
                    h.set_gid(*id as u64);
                }
                raw_name(&mut h, p);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            E::Sym(p, t) | E::Hard(p, t) => {
                h.set_entry_type(if matches!(e, E::Sym(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                h.set_mode(0o777);
                raw_name(&mut h, p);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Dev(p) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_size(0);
                h.set_mode(0o666);
                raw_name(&mut h, p);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// Writes the name bytes directly, so names the tar crate would refuse ("../x") can be made.
fn raw_name(h: &mut tar::Header, p: &str) {
    let n = &mut h.as_old_mut().name;
    n.fill(0);
    n[..p.len()].copy_from_slice(p.as_bytes());
}

fn apply(root: &Path, entries: &[E]) -> Result<Stats, hutch_image::ImageError> {
    let mut st = Stats::default();
    apply_layer(root, layer(entries).as_slice(), Limits::default(), &mut st).map(|_| st)
}

#[test]
fn whiteouts_and_opaque_dirs_across_three_layers() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    apply(
        r,
        &[
            E::Dir("etc/", 0o755),
            E::File("etc/a", b"a1", 0o644),
            E::File("etc/b", b"b1", 0o644),
            E::Dir("opt/", 0o755),
            E::File("opt/old1", b"x", 0o644),
            E::Dir("opt/sub/", 0o755),
            E::File("opt/sub/old2", b"x", 0o644),
        ],
    )
    .unwrap();
    apply(
        r,
        &[
            E::File("etc/.wh.a", b"", 0o644),
            E::File("etc/c", b"c2", 0o644),
            // Same layer: new file then opaque marker; the new file must survive.
            E::File("opt/new", b"n", 0o644),
            E::File("opt/.wh..wh..opq", b"", 0o644),
        ],
    )
    .unwrap();
    assert!(!r.join("etc/a").exists());
    assert_eq!(std::fs::read(r.join("etc/b")).unwrap(), b"b1");
    assert!(r.join("opt/new").exists());
    assert!(!r.join("opt/old1").exists() && !r.join("opt/sub").exists());
    apply(
        r,
        &[
            E::File("etc/a", b"a3", 0o600),
            E::File("etc/.wh.c", b"", 0o644),
            E::File("etc/.wh.never-existed", b"", 0o644),
        ],
    )
    .unwrap();
    assert_eq!(std::fs::read(r.join("etc/a")).unwrap(), b"a3");
    assert_eq!(
        std::fs::metadata(r.join("etc/a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert!(!r.join("etc/c").exists());
    // Whiteout files themselves never appear.
    assert!(!r.join("etc/.wh.c").exists() && !r.join("opt/.wh..wh..opq").exists());
}

#[test]
fn hardlinks_symlinks_modes_ownership_and_devices() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let st = apply(
        r,
        &[
            E::Dir("bin/", 0o755),
            E::Owned("bin/su", b"suid", 0o4755, 1000),
            E::Hard("bin/su2", "bin/su"),
            E::Sym("bin/sh", "/bin/busybox"),
            E::Sym("lib", "usr/lib"),
            E::File("lib/libx.so", b"lib", 0o644), // through the symlink, inside the root
            E::Dev("dev/null"),
        ],
    )
    .unwrap();
    let m = std::fs::metadata(r.join("bin/su")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    assert_eq!(m.ino(), std::fs::metadata(r.join("bin/su2")).unwrap().ino());
    assert_eq!(
        std::fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(std::fs::read(r.join("usr/lib/libx.so")).unwrap(), b"lib");
    assert_eq!(st.skipped_devices, 1);
    assert!(!r.join("dev/null").exists());
}

#[test]
fn entries_escaping_the_root_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("root");
    std::fs::create_dir(&r).unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    // `..` in a name.
    assert!(apply(&r, &[E::File("../evil", b"x", 0o644)]).is_err());
    assert!(apply(&r, &[E::File("a/../../evil", b"x", 0o644)]).is_err());
    // A symlink to an absolute host path, then a write through it: lands inside the root.
    apply(
        &r,
        &[
            E::Sym("escape", &target),
            E::File("escape/pwned", b"x", 0o644),
        ],
    )
    .unwrap();
    assert!(!outside.path().join("pwned").exists());
    assert!(r
        .join(target.trim_start_matches('/'))
        .join("pwned")
        .exists());
    // A relative symlink climbing out is clamped at the root.
    apply(
        &r,
        &[
            E::Sym("up", "../../../../.."),
            E::File("up/tmp-pwned", b"x", 0o644),
        ],
    )
    .unwrap();
    assert!(r.join("tmp-pwned").exists());
    // Hardlinks to outside files are refused.
    assert!(apply(&r, &[E::Hard("h", "../../etc/passwd")]).is_err());
    assert!(
        std::fs::read_dir(d.path()).unwrap().count() == 1,
        "nothing written beside the root"
    );
}

#[test]
fn limits_stop_layer_bombs() {
    let d = tempfile::tempdir().unwrap();
    let files: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let entries: Vec<E> = files
        .iter()
        .map(|f| E::File(f, b"12345678", 0o644))
        .collect();
    let mut st = Stats::default();
    let lim = Limits {
        max_entries: 10,
        max_bytes: 1 << 30,
        ..Limits::default()
    };
    let e = apply_layer(d.path(), layer(&entries).as_slice(), lim, &mut st).unwrap_err();
    assert!(e.to_string().contains("entries"), "{e}");
    let mut st = Stats::default();
    let lim = Limits {
        max_entries: 1000,
        max_bytes: 100,
        ..Limits::default()
    };
    let e = apply_layer(d.path(), layer(&entries).as_slice(), lim, &mut st).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
}

#[test]
fn truncated_layer_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let full = layer(&[E::File("big", &[7u8; 4096], 0o644)]);
    let cut = &full[..1024];
    let mut st = Stats::default();
    assert!(apply_layer(d.path(), cut, Limits::default(), &mut st).is_err());
}

#[test]
fn gzip_and_zstd_layers_are_decompressed() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let raw = layer(&[E::File("hello", b"compressed", 0o644)]);
    let gz = d.path().join("l.gz");
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(&raw).unwrap();
    e.finish().unwrap();
    let zst = d.path().join("l.zst");
    std::fs::write(&zst, zstd::encode_all(raw.as_slice(), 3).unwrap()).unwrap();
    for (i, p) in [gz, zst].iter().enumerate() {
        let root = d.path().join(format!("r{i}"));
        std::fs::create_dir(&root).unwrap();
        let mut st = Stats::default();
        apply_layer(
            &root,
            hutch_image::unpack::open_layer(p).unwrap(),
            Limits::default(),
            &mut st,
        )
        .unwrap();
        assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"compressed");
    }
}
