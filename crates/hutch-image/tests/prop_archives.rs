//! Property tests: random sequences of tar entries full of links (`..`, absolute targets,
//! targets naming the canary, chains through earlier links, hard links to anything) applied
//! as a layer and imported as an archive. Whatever the sequence, and whether it is accepted or
//! refused, nothing outside the store changes and nothing appears at the real `/`. Case counts
//! are bounded so the suite runs in seconds.

mod support;

use hutch_image::unpack::{apply_layer, Stats};
use hutch_image::Limits;
use proptest::prelude::*;
use support::{at_host_root, Host, Tar};

#[derive(Debug, Clone)]
enum Spec {
    Dir(String),
    File(String),
    Sym(String, String),
    Hard(String, String),
    Whiteout(String),
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "up", "..", ".", "c", "/"]),
        1..5,
    )
    .prop_map(|v| v.join("/"))
}

/// `@C@` stands for the canary's absolute path (known only once a case's host exists).
fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        path(),
        prop::sample::select(vec![
            "../..",
            "..",
            "/",
            "a/../../..",
            "../../../../../../../../..",
            "/etc",
            "@C@",
            "@C@/file",
            "@C@/sub",
            "../../canary",
            "../../../canary/file",
        ])
        .prop_map(String::from),
    ]
}

fn specs() -> impl Strategy<Value = Vec<Spec>> {
    let one = prop_oneof![
        path().prop_map(Spec::Dir),
        path().prop_map(Spec::File),
        (path(), target()).prop_map(|(p, t)| Spec::Sym(p, t)),
        (path(), target()).prop_map(|(p, t)| Spec::Hard(p, t)),
        path().prop_map(Spec::Whiteout),
    ];
    prop::collection::vec(one, 1..14)
}

/// Files are named so that one landing at the real `/` would be noticed.
fn marker() -> String {
    format!("hutch-prop-{}", std::process::id())
}

fn build(specs: &[Spec], canary: &str) -> Vec<u8> {
    let mut t = Tar::default();
    let m = marker();
    let c = |to: &str| to.replace("@C@", canary);
    for s in specs {
        match s {
            Spec::Dir(p) => t.dir(&format!("{p}/")),
            Spec::File(p) => t.file(&format!("{p}/{m}"), b"escaped?"),
            Spec::Sym(p, to) => t.symlink(p, &c(to)),
            Spec::Hard(p, to) => t.hardlink(p, &c(to)),
            Spec::Whiteout(p) => t.file(&format!("{p}/.wh.{m}"), b""),
        }
    }
    t.finish()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn layer_application_never_escapes(sp in specs()) {
        let h = Host::new();
        let canary = h.canary().display().to_string();
        let tree = h.path().join("store/tmp/tree");
        std::fs::create_dir(&tree).unwrap();
        let mut st = Stats::default();
        // Twice on one tree, as an image stacks layers: the second meets the first's links.
        let _ = apply_layer(&tree, build(&sp, &canary).as_slice(), Limits::default(), &mut st);
        let _ = apply_layer(&tree, build(&sp, &canary).as_slice(), Limits::default(), &mut st);
        std::fs::remove_dir_all(&tree).unwrap();
        h.check();
        prop_assert!(!at_host_root(&marker()), "{sp:?}");
    }

    #[test]
    fn archive_import_never_escapes(sp in specs()) {
        let h = Host::new();
        let canary = h.canary().display().to_string();
        let p = h.input("a.tar", &build(&sp, &canary));
        // Not an image: refused in the end, after extraction went over all of it.
        prop_assert!(h.store.import(&p, None).is_err());
        h.check();
        prop_assert!(!at_host_root(&marker()), "{sp:?}");
    }
}

/// A sparse map as the strategy makes it: real size, (offset, length) segments, format (0 old
/// GNU, 1 PAX 1.0, 2 PAX 0.1), and the path it is written at.
type SparseCase = (u64, Vec<(u64, u64)>, u8, String);

fn sparse_case() -> impl Strategy<Value = SparseCase> {
    (
        0u64..20_000,
        prop::collection::vec((0u64..24_000, 0u64..1500), 0..30),
        0u8..3,
        any::<bool>(),
        path(),
    )
        .prop_map(|(real, mut segs, fmt, tidy, p)| {
            // Half the cases are sorted, with no overlap: mostly valid maps.
            if tidy {
                segs.sort();
                let mut end = 0;
                for s in &mut segs {
                    s.0 = s.0.max(end);
                    end = s.0 + s.1;
                }
            }
            (real, segs, fmt, p)
        })
}

/// Whether a map is one to accept: sorted, not overlapping, within the real size.
fn valid_map(real: u64, segs: &[(u64, u64)]) -> bool {
    let mut end = 0;
    segs.iter().all(|&(o, l)| {
        let ok = o >= end && o + l <= real;
        end = o + l;
        ok
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any sparse map, in any format, at any path: an exact file with holes when the map is
    /// valid, an error when it is not; never a panic, nothing outside the tree.
    #[test]
    fn sparse_maps_are_exact_or_refused(case in sparse_case()) {
        let (real, segs, fmt, p) = case;
        let h = Host::new();
        let tree = h.path().join("store/tmp/tree");
        std::fs::create_dir(&tree).unwrap();
        let mut data = Vec::new();
        let mut want = vec![0u8; real as usize];
        for (i, &(o, l)) in segs.iter().enumerate() {
            let chunk: Vec<u8> = (0..l).map(|k| (i as u8).wrapping_mul(31) ^ k as u8 | 1).collect();
            if valid_map(real, &segs) {
                want[o as usize..(o + l) as usize].copy_from_slice(&chunk);
            }
            data.extend(chunk);
        }
        let mut t = Tar::default();
        t.symlink("up", "..");
        t.dir("a/");
        let name = format!("up/{p}/{}", marker());
        match fmt {
            0 => t.sparse_gnu(&name, real, &segs, data.len() as u64, &data),
            1 => t.sparse_pax1(&name, real, &segs, &data),
            _ => t.sparse_pax01(&name, real, &segs, &data),
        }
        let mut st = Stats::default();
        let r = apply_layer(&tree, t.finish().as_slice(), Limits::default(), &mut st);
        if valid_map(real, &segs) {
            let r = r.map_err(|e| e.to_string());
            // `..` in the generated path is refused before the map matters.
            if p.split('/').any(|c| c == "..") {
                prop_assert!(r.is_err());
            } else {
                prop_assert!(r.is_ok(), "{r:?}");
                let mut found = None;
                let mut todo = vec![tree.clone()];
                while let Some(d) = todo.pop() {
                    for e in std::fs::read_dir(&d).unwrap() {
                        let e = e.unwrap();
                        let ft = e.file_type().unwrap();
                        if ft.is_dir() {
                            todo.push(e.path());
                        } else if ft.is_file() && e.file_name().to_string_lossy() == marker() {
                            found = Some(e.path());
                        }
                    }
                }
                let f = found.expect("the sparse file was made");
                prop_assert_eq!(std::fs::read(&f).unwrap(), want);
            }
        } else {
            prop_assert!(r.is_err());
        }
        std::fs::remove_dir_all(&tree).unwrap();
        h.check();
        prop_assert!(!at_host_root(&marker()));
    }
}
