//! GNU sparse entries become files with holes, through layer application and archive import.
//! Real archives are made with GNU tar (`--sparse` in the old GNU, PAX 1.0 and PAX 0.1
//! formats) from files made with `set_len` and small writes at offsets; the applied file must
//! have the same content, the real size, and fewer allocated blocks than its size. Hand-made
//! hostile maps (unsorted, overlapping, out of range, overflowing, too many segments, huge
//! map text, apparent size over the budget, unsupported versions) must each be a clear
//! `ImageError`, leave nothing outside the store and never panic.

mod support;

use hutch_image::unpack::{apply_layer, Stats};
use hutch_image::{ImageError, Limits};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{map_text, oci_archive, sha, Host, Tar};

fn apply(root: &Path, layer: &[u8], limits: Limits) -> Result<Stats, ImageError> {
    let mut st = Stats::default();
    apply_layer(root, layer, limits, &mut st).map(|_| st)
}

fn have_gnu_tar() -> bool {
    let ok = Command::new("tar")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GNU tar")
        });
    if !ok {
        eprintln!("GNU tar not found: skipping");
    }
    ok
}

/// Makes a sparse file of `size` bytes with `chunks` (offset, bytes) written into it.
fn holey(path: &Path, size: u64, chunks: &[(u64, &[u8])]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (o, d) in chunks {
        f.write_all_at(d, *o).unwrap();
    }
}

/// Runs GNU tar with `args` in `dir`, writing `out`.
fn gnu_tar(dir: &Path, out: &Path, args: &[&str], names: &[&str]) {
    let st = Command::new("tar")
        .args(args)
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .args(names)
        .status()
        .unwrap();
    assert!(st.success(), "tar {args:?}");
}

const FORMATS: [&[&str]; 3] = [
    &["--sparse", "--format=gnu"],
    &["--sparse", "--format=posix"],
    &["--sparse", "--format=posix", "--sparse-version=0.1"],
];

/// Checks that GNU tar really wrote sparse entries for `args`.
fn is_sparse_archive(bytes: &[u8], args: &[&str]) -> bool {
    if args.contains(&"--format=gnu") {
        bytes.chunks(512).any(|b| b.len() == 512 && b[156] == b'S')
    } else {
        bytes.windows(11).any(|w| w == b"GNU.sparse.")
    }
}

#[test]
fn gnu_tar_sparse_files_become_holes_in_layers() {
    if !have_gnu_tar() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // 30 data chunks: more than the header's 4 slots and one extension block's 21.
    let data: Vec<Vec<u8>> = (0..30u8).map(|i| vec![i + 1; 100 + i as usize]).collect();
    let chunks: Vec<(u64, &[u8])> = data
        .iter()
        .enumerate()
        .map(|(i, v)| ((i as u64) * (256 << 10) + 777, v.as_slice()))
        .collect();
    holey(&src.join("many"), 16 << 20, &chunks); // ends with a hole
    holey(&src.join("tail"), 4 << 20, &[((4 << 20) - 5, b"tail!")]); // ends with data
    holey(&src.join("empty"), 8 << 20, &[]); // all hole
    let names = ["many", "tail", "empty"];
    for args in FORMATS {
        let tarball = d.path().join("l.tar");
        gnu_tar(&src, &tarball, args, &names);
        let bytes = std::fs::read(&tarball).unwrap();
        assert!(
            is_sparse_archive(&bytes, args),
            "{args:?} wrote no sparse entry"
        );
        assert!(bytes.len() < 1 << 20, "{args:?}: {}", bytes.len());
        let tree = d.path().join("tree");
        let st = apply(&tree_dir(&tree), &bytes, Limits::default()).unwrap();
        for n in names {
            let (a, b) = (src.join(n), tree.join(n));
            let (ma, mb) = (a.metadata().unwrap(), b.metadata().unwrap());
            // Same content (compared whole: hashing in a debug build is slow).
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{args:?} {n}"
            );
            assert_eq!(ma.len(), mb.len(), "{args:?} {n}");
            assert!(
                mb.blocks() * 512 < mb.len() / 8,
                "{args:?} {n}: {} blocks for {} bytes",
                mb.blocks(),
                mb.len()
            );
        }
        // The apparent sizes count against the budget.
        assert!(st.bytes >= (28 << 20), "{args:?}: {}", st.bytes);
        std::fs::remove_dir_all(&tree).unwrap();
    }
}

fn tree_dir(p: &Path) -> PathBuf {
    std::fs::create_dir(p).unwrap();
    p.to_path_buf()
}

/// Writes a tar stream (trusted, made by the tests) to `dir`, leaving every all-zero block of a
/// file as a hole, so that GNU tar's `--sparse` finds them.
fn unpack_holey(bytes: &[u8], dir: &Path) {
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = dir.join(e.path().unwrap());
        if e.header().entry_type().is_dir() {
            std::fs::create_dir_all(&p).unwrap();
            continue;
        }
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut v).unwrap();
        let chunks: Vec<(u64, &[u8])> = v
            .chunks(512)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&b| b != 0))
            .map(|(i, c)| (i as u64 * 512, c))
            .collect();
        holey(&p, v.len() as u64, &chunks);
    }
}

#[test]
fn gnu_tar_sparse_archives_import() {
    if !have_gnu_tar() {
        return;
    }
    // A layer with a long run of zeros (an uncompressed tar of a 6 MiB mostly-zero file):
    // written into the layout with holes, then archived by GNU tar with --sparse.
    let mut big = vec![0u8; 6 << 20];
    big[3 << 20] = 1;
    big[(6 << 20) - 1] = 2;
    let mut l = Tar::default();
    l.file("big", &big);
    let layer = l.finish();
    for args in FORMATS {
        let h = Host::new();
        let layout = h.path().join("in/layout");
        std::fs::create_dir_all(&layout).unwrap();
        unpack_holey(&oci_archive(std::slice::from_ref(&layer), |_| {}), &layout);
        let blob = layout.join("blobs/sha256").join(&sha(&layer)[7..]);
        assert!(blob.metadata().unwrap().blocks() * 512 < 1 << 20);
        let p = h.path().join("in/img.tar");
        gnu_tar(&layout, &p, args, &["."]);
        let bytes = std::fs::read(&p).unwrap();
        assert!(is_sparse_archive(&bytes, args), "{args:?}");
        assert!(bytes.len() < 1 << 20, "{args:?}: {}", bytes.len());
        std::fs::remove_dir_all(&layout).unwrap();
        h.input("img.tar", &bytes);
        // The layer blob is read back holes and all: its digest matches, the image builds.
        let img = h.store.import(&p, None).unwrap();
        assert_eq!(img.name, "hostile:latest");
        h.check();
    }
}

fn tree(h: &Host) -> PathBuf {
    tree_dir(&h.path().join("store/tmp/tree"))
}

#[test]
fn hand_made_sparse_entries_round_trip() {
    let h = Host::new();
    let segs = [(0u64, 3u64), (1000, 4), (5000, 0)];
    let data = b"abcdefg";
    let mut want = vec![0u8; 5000];
    want[..3].copy_from_slice(b"abc");
    want[1000..1004].copy_from_slice(b"defg");
    let mut t = Tar::default();
    t.sparse_gnu("old", 5000, &segs, 7, data);
    t.sparse_pax1("pax1", 5000, &segs, data);
    t.sparse_pax01("pax01", 5000, &segs, data);
    // A sparse file with a 1 TiB apparent size fits a budget that allows it.
    t.sparse_gnu("huge", 1 << 40, &[((1 << 40) - 2, 2)], 2, b"hi");
    t.file("after", b"still read");
    let tr = tree(&h);
    let lim = Limits {
        max_bytes: 2 << 40,
        max_layer_bytes: 2 << 40,
        ..Limits::default()
    };
    let st = apply(&tr, &t.finish(), lim).unwrap();
    for n in ["old", "pax1", "pax01"] {
        assert_eq!(std::fs::read(tr.join(n)).unwrap(), want, "{n}");
    }
    let m = tr.join("huge").metadata().unwrap();
    assert_eq!(m.len(), 1 << 40);
    assert!(m.blocks() < 64, "{}", m.blocks());
    assert!(st.bytes > 1 << 40, "{}", st.bytes);
    assert_eq!(std::fs::read(tr.join("after")).unwrap(), b"still read");
    // A sparse entry behind a link chain lands inside the tree, like any file.
    let mut t = Tar::default();
    t.dir("d1/");
    t.symlink("d1/up", "..");
    t.symlink("d1/abs", &h.canary().display().to_string());
    t.sparse_gnu("d1/up/x", 100, &[(10, 2)], 2, b"xx");
    t.sparse_pax1("d1/abs/file", 100, &[(10, 2)], b"yy");
    apply(&tr, &t.finish(), Limits::default()).unwrap();
    assert_eq!(std::fs::read(tr.join("x")).unwrap().len(), 100);
    assert!(tr
        .join(h.canary().strip_prefix("/").unwrap())
        .join("file")
        .exists());
    std::fs::remove_dir_all(&tr).unwrap();
    h.check();
}

/// Applies `layer` and imports it as an archive, both within the store's limits; both must
/// fail with an error `ok` accepts.
fn refused(h: &Host, what: &str, layer: &[u8], ok: impl Fn(&ImageError) -> bool) {
    let tr = tree(h);
    let e = apply(&tr, layer, h.store.limits).unwrap_err();
    assert!(ok(&e), "{what}, layer: {e:?}");
    std::fs::remove_dir_all(&tr).unwrap();
    let p = h.input("a.tar", layer);
    let e = h.store.import(&p, None).unwrap_err();
    assert!(ok(&e), "{what}, archive: {e:?}");
    h.check();
}

/// A hostile map: what it is, the real size, the segments, the data.
type Case = (&'static str, u64, &'static [(u64, u64)], &'static [u8]);

fn bad_map(e: &ImageError) -> bool {
    matches!(e, ImageError::BadLayer(m) if m.contains("sparse file"))
}

#[test]
fn hostile_maps_are_refused() {
    let h = Host::new();
    let cases: [Case; 6] = [
        ("unsorted", 100, &[(50, 2), (0, 2)], b"abcd"),
        ("overlapping", 100, &[(0, 10), (5, 2)], &[7; 12]),
        ("past the end", 100, &[(99, 2)], b"ab"),
        ("overflow", u64::MAX, &[(u64::MAX - 1, 2)], b"ab"),
        ("short data", 100, &[(0, 10)], b"ab"),
        ("long data", 100, &[(0, 1)], b"ab"),
    ];
    for (what, real, segs, data) in cases {
        let size = data.len() as u64;
        for fmt in 0..3 {
            let mut t = Tar::default();
            match fmt {
                0 => t.sparse_gnu("f", real, segs, size, data),
                1 => t.sparse_pax1("f", real, segs, data),
                _ => t.sparse_pax01("f", real, segs, data),
            }
            let layer = t.finish();
            let ok = bad_map;
            let tr = tree(&h);
            let e = apply(&tr, &layer, Limits::default()).unwrap_err();
            assert!(ok(&e), "{what} fmt {fmt}: {e:?}");
            // Nothing of the file was made.
            assert!(!tr.join("f").exists(), "{what} fmt {fmt}");
            std::fs::remove_dir_all(&tr).unwrap();
        }
    }
    // Through archive import as well.
    let mut t = Tar::default();
    t.sparse_gnu("f", 100, &[(0, 10), (5, 2)], 12, &[7; 12]);
    refused(&h, "overlapping", &t.finish(), bad_map);
    h.check();
}

#[test]
fn map_size_caps() {
    let h = Host::new();
    let limit = |e: &ImageError| matches!(e, ImageError::Limit(m) if m.contains("more than 65536 segments"));
    // Old GNU: extension blocks past the cap (65537 one-byte segments).
    let segs: Vec<(u64, u64)> = (0..65537u64).map(|i| (i * 2, 1)).collect();
    let mut t = Tar::default();
    t.sparse_gnu("f", 1 << 20, &segs, 65537, &[1; 65537]);
    refused(&h, "old GNU cap", &t.finish(), limit);
    // Old GNU: an endless chain of extension blocks with no segments in them.
    let mut t = Tar::default();
    t.sparse_gnu("f", 100, &[(0, 0); 5], 0, b"");
    let mut b = t.0;
    b.truncate(1024);
    b[512..1024].fill(0);
    b[512 + 504] = 1;
    let block = b[512..1024].to_vec();
    for _ in 0..4000 {
        b.extend_from_slice(&block);
    }
    refused(
        &h,
        "endless extension blocks",
        &Tar(b).finish(),
        |e| matches!(e, ImageError::Limit(m) if m.contains("extension blocks")),
    );
    // PAX 1.0: the count line is over the cap (nothing more is read).
    let mut t = Tar::default();
    t.sparse_pax1_text("f", 1 << 20, b"65537\n", b"");
    refused(&h, "1.0 count", &t.finish(), limit);
    // PAX 0.1: a map record with too many pairs.
    let mut t = Tar::default();
    t.sparse_pax01("f", 1 << 20, &segs, &[1; 65537]);
    refused(&h, "0.1 map", &t.finish(), limit);
    // PAX 1.0: a huge map text (one endless line) is refused after 20 digits.
    let mut t = Tar::default();
    t.sparse_pax1_text("f", 1 << 20, &vec![b'1'; 8 << 20], b"");
    refused(
        &h,
        "huge text",
        &t.finish(),
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("longer than 20 digits")),
    );
    // PAX 1.0: a map cut short (NULs where lines should be), and one that claims more lines
    // than the entry holds.
    let mut text = map_text(&[(0, 1), (10, 1)]);
    text.truncate(6);
    let mut t = Tar::default();
    t.sparse_pax1_text("f", 100, &text, b"");
    refused(
        &h,
        "map cut short",
        &t.finish(),
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("bad number")),
    );
    let mut text = b"10000\n".to_vec();
    text.extend(b"1\n".repeat(253));
    let mut t = Tar::default();
    t.sparse_pax1_text("f", 100, &text, b"");
    refused(
        &h,
        "map past data",
        &t.finish(),
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("map runs past")),
    );
    // The largest map allowed is fine.
    let segs: Vec<(u64, u64)> = (0..65536u64).map(|i| (i * 2, 1)).collect();
    let mut t = Tar::default();
    t.sparse_pax1("f", 1 << 20, &segs, &[1; 65536]);
    let tr = tree(&h);
    apply(&tr, &t.finish(), Limits::default()).unwrap();
    let got = std::fs::read(tr.join("f")).unwrap();
    assert_eq!(got.len(), 1 << 20);
    assert!(got[..1 << 17].chunks(2).all(|c| c == [1, 0]));
    std::fs::remove_dir_all(&tr).unwrap();
    h.check();
}

#[test]
fn apparent_sizes_count_against_the_budget() {
    let over = |e: &ImageError| matches!(e, ImageError::Limit(m) if m.contains("full size"));
    // 1 PiB with no data at all: refused by the budget, not accepted for having no data.
    let lim = Limits {
        max_bytes: 1 << 30,
        ..Limits::default()
    };
    let h = Host::with_limits(lim);
    for fmt in 0..3 {
        let mut t = Tar::default();
        match fmt {
            0 => t.sparse_gnu("f", 1 << 50, &[], 0, b""),
            1 => t.sparse_pax1("f", 1 << 50, &[], b""),
            _ => t.sparse_pax01("f", 1 << 50, &[(1 << 50, 0)], b""),
        }
        refused(&h, &format!("1 PiB, format {fmt}"), &t.finish(), over);
    }
    // Files that fit one by one add up: two of 600 MiB in a 1 GiB budget.
    let mut t = Tar::default();
    t.sparse_gnu("a", 600 << 20, &[], 0, b"");
    t.sparse_gnu("b", 600 << 20, &[], 0, b"");
    let layer = t.finish();
    refused(&h, "two files", &layer, over);
    // Across layers of one image too: the first layer's holes are counted in Stats.
    let one = {
        let mut t = Tar::default();
        t.sparse_gnu("a", 600 << 20, &[], 0, b"");
        t.finish()
    };
    let tr = tree(&h);
    let mut st = Stats::default();
    apply_layer(&tr, one.as_slice(), lim, &mut st).unwrap();
    assert!(st.bytes >= 600 << 20);
    let e = apply_layer(&tr, one.as_slice(), lim, &mut st).unwrap_err();
    assert!(over(&e), "{e:?}");
    std::fs::remove_dir_all(&tr).unwrap();
    // The per-layer cap holds too, in an image of two such layers.
    let h2 = Host::with_limits(Limits {
        max_layer_bytes: 512 << 20,
        ..Limits::default()
    });
    let p = h2.input("img.tar", &oci_archive(&[one], |_| {}));
    let e = h2.store.import(&p, None).unwrap_err();
    assert!(
        matches!(e, ImageError::Limit(ref m) if m.contains("layer decompresses to more than")),
        "{e:?}"
    );
    h2.check();
    h.check();
}

#[test]
fn unsupported_sparse_formats() {
    let h = Host::new();
    let unsupported =
        |e: &ImageError| matches!(e, ImageError::Unsupported(m) if m.contains("GNU sparse format"));
    // PAX 0.0: repeated offset/numbytes records.
    let mut t = Tar::default();
    t.pax(&[
        ("GNU.sparse.size", b"100"),
        ("GNU.sparse.numblocks", b"1"),
        ("GNU.sparse.offset", b"0"),
        ("GNU.sparse.numbytes", b"2"),
    ]);
    t.file("f", b"ab");
    refused(&h, "0.0", &t.finish(), unsupported);
    // Versions other than 1.0.
    for (maj, min) in [("1", "1"), ("2", "0"), ("0", "1")] {
        let mut t = Tar::default();
        t.pax(&[
            ("GNU.sparse.major", maj.as_bytes()),
            ("GNU.sparse.minor", min.as_bytes()),
            ("GNU.sparse.realsize", b"100"),
        ]);
        t.file("f", b"");
        refused(&h, &format!("{maj}.{min}"), &t.finish(), unsupported);
    }
    // Sparse records on something other than a file, and both maps at once.
    let mut t = Tar::default();
    t.pax(&[("GNU.sparse.map", b"0,0"), ("GNU.sparse.size", b"10")]);
    t.dir("d/");
    refused(
        &h,
        "not a file",
        &t.finish(),
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("not a file")),
    );
    let mut t = Tar::default();
    t.pax(&[("GNU.sparse.map", b"0,0"), ("GNU.sparse.size", b"10")]);
    t.sparse_gnu("f", 10, &[(0, 0)], 0, b"");
    refused(
        &h,
        "both maps",
        &t.finish(),
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("both")),
    );
    // An old GNU map whose extension blocks are cut off.
    let segs: Vec<(u64, u64)> = (0..10u64).map(|i| (i * 10, 1)).collect();
    let mut t = Tar::default();
    t.sparse_gnu("f", 100, &segs, 10, &[1; 10]);
    let mut b = t.0;
    b.truncate(512);
    refused(
        &h,
        "cut ext",
        &b,
        |e| matches!(e, ImageError::BadLayer(m) if m.contains("truncated")),
    );
    h.check();
}
