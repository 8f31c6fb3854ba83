//! Attack shapes against [`Root`]: symlink chains, absolute links, `..`, links and hard links to
//! outside, writes through existing links. Each test runs in a temp "host" holding the root and
//! a canary directory; the oracle is that the canary and the host are unchanged.

use super::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::create_dir(dir.path().join("canary")).unwrap();
        std::fs::write(dir.path().join("canary/file"), b"precious").unwrap();
        std::fs::set_permissions(
            dir.path().join("canary/file"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Host { dir }
    }
    fn root(&self, mode: Mode) -> Root {
        Root::open(&self.dir.path().join("root"), mode).unwrap()
    }
    fn rootp(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn canary(&self) -> PathBuf {
        self.dir.path().join("canary")
    }
    /// Everything outside `root/`: names, kinds, contents, modes and owners.
    fn outside(&self) -> BTreeMap<PathBuf, (u32, u32, Vec<u8>)> {
        let mut m = BTreeMap::new();
        let mut todo = vec![self.dir.path().to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == self.rootp() {
                    continue;
                }
                let md = std::fs::symlink_metadata(&p).unwrap();
                let data = if md.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                if md.is_dir() {
                    todo.push(p.clone());
                }
                m.insert(p, (md.mode(), md.uid(), data));
            }
        }
        m
    }
}

fn abs(h: &Host) -> String {
    h.canary().display().to_string()
}

#[test]
fn symlink_chain_cannot_climb_out() {
    // The reproduced archive attack: each hop `../..` looks harmless from where it sits.
    for mode in [Mode::Beneath, Mode::InRoot] {
        let h = Host::new();
        let before = h.outside();
        let r = h.root(mode);
        r.create_dir_all(Path::new("d1/d2"), 0o755).unwrap();
        r.symlink(Path::new("../.."), Path::new("d1/d2/up"))
            .unwrap();
        let mut prefix = PathBuf::from("d1/d2/up");
        let mut refused = false;
        for i in 0..6 {
            let link = prefix.join(format!("e{i}"));
            match r.symlink(Path::new("../.."), &link) {
                Ok(()) => prefix = link,
                Err(e) => {
                    assert!(matches!(e, FsError::Escapes { .. }), "{e}");
                    refused = true;
                    break;
                }
            }
        }
        let res = r.create_file(&prefix.join("pwned"), 0o644);
        match mode {
            Mode::Beneath => assert!(refused || res.is_err()),
            Mode::InRoot => {
                res.unwrap().write_all(b"x").unwrap();
            }
        }
        assert_eq!(h.outside(), before, "{mode:?}");
    }
}

#[test]
fn absolute_symlinks_stay_inside_or_fail() {
    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::Beneath);
    r.symlink(Path::new(&abs(&h)), Path::new("abs")).unwrap();
    let e = r.create_file(Path::new("abs/new"), 0o644).unwrap_err();
    assert!(matches!(e, FsError::Escapes { .. }), "{e}");
    assert!(r.open_file(Path::new("abs/file")).is_err());
    assert!(r.create_dir_all(Path::new("abs/sub"), 0o755).is_err());
    assert_eq!(h.outside(), before);

    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::InRoot);
    r.symlink(Path::new(&abs(&h)), Path::new("abs")).unwrap();
    // As in a chroot: the absolute target is taken inside the root, made there.
    r.create_dir_all(Path::new("abs/sub"), 0o755).unwrap();
    r.create_file(Path::new("abs/sub/new"), 0o644).unwrap();
    let inside = h
        .rootp()
        .join(abs(&h).trim_start_matches('/'))
        .join("sub/new");
    assert!(inside.is_file(), "{}", inside.display());
    assert!(
        r.open_file(Path::new("abs/file")).is_err(),
        "host file readable"
    );
    assert_eq!(h.outside(), before);
}

#[test]
fn dotdot_and_relative_links_out() {
    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::Beneath);
    for p in ["../x", "a/../../x", "../canary/file"] {
        assert!(r.create_file(Path::new(p), 0o644).is_err(), "{p}");
    }
    assert!(r.open_file(Path::new("../canary/file")).is_err());
    r.symlink(Path::new("../canary"), Path::new("out")).unwrap();
    assert!(matches!(
        r.open_file(Path::new("out/file")).unwrap_err(),
        FsError::Escapes { .. }
    ));
    assert!(r.replace_file(Path::new("out/file"), 0o644).is_err());
    assert!(r.remove(Path::new("out/file")).is_err());
    assert!(r
        .rename(Path::new("out"), Path::new("../canary/moved"))
        .is_err());
    assert_eq!(h.outside(), before);

    let r = h.root(Mode::InRoot);
    let mut f = r.create_file(Path::new("../../x"), 0o644).unwrap();
    f.write_all(b"clamped").unwrap();
    assert_eq!(std::fs::read(h.rootp().join("x")).unwrap(), b"clamped");
    assert_eq!(h.outside(), before);
}

#[test]
fn hard_links_only_within_the_root() {
    let h = Host::new();
    let before = h.outside();
    for mode in [Mode::Beneath, Mode::InRoot] {
        let r = h.root(mode);
        assert!(r
            .hard_link(Path::new("../canary/file"), Path::new("h1"))
            .is_err());
        let _ = r.symlink(Path::new(&abs(&h)), Path::new("abs"));
        let _ = r.symlink(Path::new("../canary"), Path::new("rel"));
        assert!(r.hard_link(Path::new("abs/file"), Path::new("h2")).is_err());
        assert!(r.hard_link(Path::new("rel/file"), Path::new("h3")).is_err());
        // A hard link to a symlink links the symlink, never its target.
        r.hard_link(Path::new("rel"), Path::new("h4")).unwrap();
        let md = std::fs::symlink_metadata(h.rootp().join("h4")).unwrap();
        assert!(md.file_type().is_symlink());
        std::fs::remove_file(h.rootp().join("h4")).unwrap();
    }
    // Between two roots: refused.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("f"), b"x").unwrap();
    let r2 = Root::open(other.path(), Mode::Beneath).unwrap();
    let r = h.root(Mode::Beneath);
    let (src, _) = r2.parent(Path::new("f")).unwrap();
    let dst = r.dir(Path::new("")).unwrap();
    assert!(matches!(
        dst.hard_link(&src, OsStr::new("f"), OsStr::new("x")),
        Err(FsError::CrossRoot(_))
    ));
    let md = std::fs::metadata(h.canary().join("file")).unwrap();
    assert_eq!(md.nlink(), 1, "canary got a link");
    assert_eq!(h.outside(), before);
}

#[test]
fn never_writes_through_an_existing_link() {
    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::InRoot);
    let target = h.canary().join("file");
    std::os::unix::fs::symlink(&target, h.rootp().join("l")).unwrap();
    // O_EXCL: refused.
    assert!(matches!(
        r.create_file(Path::new("l"), 0o644).unwrap_err(),
        FsError::Exists(_)
    ));
    // O_NOFOLLOW: refused.
    assert!(r.open_file(Path::new("l")).is_err());
    assert!(r.open_rw(Path::new("l"), 0o644).is_err());
    // chmod/chown/xattr on the link leave the target alone.
    let d = r.dir(Path::new("")).unwrap();
    d.chmod(OsStr::new("l"), 0o777).unwrap();
    d.lchown(OsStr::new("l"), 4242, 4242).unwrap();
    assert!(d.set_xattr(OsStr::new("l"), b"user.x", b"v").is_err());
    // Replacing: the link goes, a new file is made, the target is untouched.
    r.replace_file(Path::new("l"), 0o600)
        .unwrap()
        .write_all(b"new")
        .unwrap();
    assert!(std::fs::symlink_metadata(h.rootp().join("l"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    // A hard link from inside to a file is replaced, not written through.
    std::fs::write(h.rootp().join("orig"), b"orig").unwrap();
    r.hard_link(Path::new("orig"), Path::new("hl")).unwrap();
    r.replace_file(Path::new("hl"), 0o644)
        .unwrap()
        .write_all(b"changed")
        .unwrap();
    assert_eq!(std::fs::read(h.rootp().join("orig")).unwrap(), b"orig");
    assert_eq!(h.outside(), before);
}

#[test]
fn remove_all_does_not_follow_links() {
    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::Beneath);
    let d = r.create_dir_all(Path::new("a/b/c"), 0o755).unwrap();
    assert_eq!(d.rel(), Path::new("a/b/c"));
    std::os::unix::fs::symlink(h.canary(), h.rootp().join("a/b/c/out")).unwrap();
    std::os::unix::fs::symlink(h.canary().join("file"), h.rootp().join("a/f")).unwrap();
    assert!(r.remove_all(Path::new("a")).unwrap());
    assert!(!h.rootp().join("a").exists());
    assert!(!r.remove_all(Path::new("a")).unwrap());
    assert_eq!(h.outside(), before);
}

#[test]
fn dangling_links_and_loops_in_create_dir_all() {
    let h = Host::new();
    let before = h.outside();
    let r = h.root(Mode::InRoot);
    r.symlink(Path::new("/made/here"), Path::new("dl")).unwrap();
    r.create_dir_all(Path::new("dl/x"), 0o755).unwrap();
    assert!(h.rootp().join("made/here/x").is_dir());
    r.symlink(Path::new("b"), Path::new("a")).unwrap();
    r.symlink(Path::new("a"), Path::new("b")).unwrap();
    let e = r.create_dir_all(Path::new("a/x"), 0o755).unwrap_err();
    assert!(matches!(e, FsError::Loop(_)), "{e}");
    // A relative dangling link climbing out is clamped at the root.
    r.symlink(Path::new("../../../up-made"), Path::new("rl"))
        .unwrap();
    r.create_dir_all(Path::new("rl/y"), 0o755).unwrap();
    assert!(h.rootp().join("up-made/y").is_dir());
    // A file in the way.
    std::fs::write(h.rootp().join("file"), b"").unwrap();
    assert!(matches!(
        r.create_dir_all(Path::new("file/x"), 0o755).unwrap_err(),
        FsError::NotDir(_)
    ));
    assert_eq!(h.outside(), before);

    // Beneath: a dangling absolute link is an escape.
    let h = Host::new();
    let r = h.root(Mode::Beneath);
    r.symlink(Path::new("/made"), Path::new("dl")).unwrap();
    assert!(matches!(
        r.create_dir_all(Path::new("dl/x"), 0o755).unwrap_err(),
        FsError::Escapes { .. }
    ));
    assert!(!Path::new("/made").exists());
}

#[test]
fn plain_operations_work() {
    let h = Host::new();
    let r = h.root(Mode::Beneath);
    let d = r.create_dir_all(Path::new("x/y"), 0o700).unwrap();
    let mut f = d.create_file(OsStr::new("f"), 0o640).unwrap();
    f.write_all(b"data").unwrap();
    drop(f);
    // chown clears setuid, so it goes first (as layer application does).
    d.lchown(OsStr::new("f"), 1000, 1000).unwrap();
    d.chmod(OsStr::new("f"), 0o4755).unwrap();
    let st = r.stat(Path::new("x/y/f")).unwrap();
    assert_eq!(
        (st.kind, st.mode, st.uid, st.size),
        (Kind::File, 0o4755, 1000, 4)
    );
    d.mkfifo(OsStr::new("p"), 0o600).unwrap();
    assert_eq!(d.stat(OsStr::new("p")).unwrap().kind, Kind::Fifo);
    assert!(d.set_xattr(OsStr::new("p"), b"user.x", b"v").is_err());
    r.rename(Path::new("x/y/f"), Path::new("x/g")).unwrap();
    let mut names = r.read_dir(Path::new("x")).unwrap();
    names.sort();
    assert_eq!(names, vec![OsString::from("g"), OsString::from("y")]);
    let mut s = String::new();
    use std::io::Read;
    r.open_file(Path::new("x/g"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "data");
    // open_rw: resumes an existing file, creates an absent one.
    let mut f = r.open_rw(Path::new("x/g"), 0o600).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4);
    f.write_all(b"D").unwrap();
    r.open_rw(Path::new("x/new"), 0o600).unwrap();
    assert!(h.rootp().join("x/new").is_file());
    assert!(
        r.open_file(Path::new("x/y/p")).is_err(),
        "a FIFO is not a file"
    );
    assert!(r.create_file(Path::new(""), 0o644).is_err());
    assert!(r.create_file(Path::new("x/.."), 0o644).is_err());
    assert_eq!(
        r.read_link(Path::new("x/g")).unwrap_err().os_error(),
        Some(libc::EINVAL)
    );
    // The root itself must be a real directory.
    std::os::unix::fs::symlink(h.rootp(), h.dir.path().join("rootlink")).unwrap();
    assert!(Root::open(&h.dir.path().join("rootlink"), Mode::Beneath).is_err());
}

#[test]
fn chmod_without_fchmodat2_leaves_link_targets_alone() {
    let h = Host::new();
    let before = h.outside();
    std::os::unix::fs::symlink(h.canary().join("file"), h.rootp().join("l")).unwrap();
    std::fs::write(h.rootp().join("f"), b"").unwrap();
    let r = h.root(Mode::Beneath);
    let d = r.dir(Path::new("")).unwrap();
    let e = sys::chmod_checked(d.fd(), OsStr::new("l"), 0o777).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
    sys::chmod_checked(d.fd(), OsStr::new("f"), 0o4711).unwrap();
    assert_eq!(r.stat(Path::new("f")).unwrap().mode, 0o4711);
    assert_eq!(h.outside(), before);
}
