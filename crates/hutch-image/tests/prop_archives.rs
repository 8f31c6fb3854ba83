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
