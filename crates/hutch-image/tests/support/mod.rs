//! Shared by the hostile-input suites: a raw tar writer that can make what well-behaved tools
//! refuse to (`..` names, huge extension headers, lying sizes), an OCI layout archive builder,
//! and a temp "host" holding the image store next to a canary, with the oracles: the canary and
//! everything outside the store unchanged, and no temp or partial files left in the store.
#![allow(dead_code)]

use hutch_image::{ImageStore, Limits};
use sha2::Digest as _;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A tar stream written header by header.
#[derive(Default)]
pub struct Tar(pub Vec<u8>);

impl Tar {
    /// Appends a header with raw name/link bytes, claiming `size` bytes of data, followed by
    /// `data` (which may be shorter than claimed) padded to a block.
    pub fn raw(&mut self, kind: u8, name: &[u8], link: &[u8], size: u64, data: &[u8]) {
        let h = header(kind, name, link, size);
        self.0.extend_from_slice(h.as_bytes());
        self.data(data);
    }
    /// Appends `data` padded to a block.
    pub fn data(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }
    /// An old GNU sparse entry (type `S`, as `tar --sparse --format=gnu` writes): the map's
    /// first 4 segments in the header, the rest in extension blocks of 21; `data` is the
    /// segments' data back to back; `size` is what the header says it is.
    pub fn sparse_gnu(
        &mut self,
        name: &str,
        real_size: u64,
        segs: &[(u64, u64)],
        size: u64,
        data: &[u8],
    ) {
        let mut h = header(b'S', name.as_bytes(), b"", size);
        let g = h.as_gnu_mut().unwrap();
        for (slot, &(o, l)) in g.sparse.iter_mut().zip(segs) {
            num_field(o, &mut slot.offset);
            num_field(l, &mut slot.numbytes);
        }
        g.isextended[0] = u8::from(segs.len() > 4);
        num_field(real_size, &mut g.realsize);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        let rest: Vec<&[(u64, u64)]> = segs.get(4..).unwrap_or_default().chunks(21).collect();
        for (i, chunk) in rest.iter().enumerate() {
            let mut b = [0u8; 512];
            for (j, &(o, l)) in chunk.iter().enumerate() {
                num_field(o, &mut b[j * 24..j * 24 + 12]);
                num_field(l, &mut b[j * 24 + 12..j * 24 + 24]);
            }
            b[504] = u8::from(i + 1 < rest.len());
            self.0.extend_from_slice(&b);
        }
        self.data(data);
    }
    /// A PAX 1.0 sparse entry (as `tar --sparse --format=posix` writes) with the map `text`
    /// (padded to a block) before `data`.
    pub fn sparse_pax1_text(&mut self, name: &str, real_size: u64, text: &[u8], data: &[u8]) {
        self.pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", name.as_bytes()),
            ("GNU.sparse.realsize", real_size.to_string().as_bytes()),
        ]);
        let mut body = text.to_vec();
        body.resize(text.len().next_multiple_of(512), 0);
        body.extend_from_slice(data);
        self.raw(b'0', b"./GNUSparseFile.0/f", b"", body.len() as u64, &body);
    }
    /// [`Tar::sparse_pax1_text`] with the map made from `segs`.
    pub fn sparse_pax1(&mut self, name: &str, real_size: u64, segs: &[(u64, u64)], data: &[u8]) {
        self.sparse_pax1_text(name, real_size, &map_text(segs), data);
    }
    /// A PAX 0.1 sparse entry: the map in a `GNU.sparse.map` record.
    pub fn sparse_pax01(&mut self, name: &str, real_size: u64, segs: &[(u64, u64)], data: &[u8]) {
        let map: Vec<String> = segs.iter().map(|(o, l)| format!("{o},{l}")).collect();
        self.pax(&[
            ("GNU.sparse.size", real_size.to_string().as_bytes()),
            ("GNU.sparse.numblocks", segs.len().to_string().as_bytes()),
            ("GNU.sparse.name", name.as_bytes()),
            ("GNU.sparse.map", map.join(",").as_bytes()),
        ]);
        self.raw(b'0', b"./GNUSparseFile.0/f", b"", data.len() as u64, data);
    }
    pub fn dir(&mut self, name: &str) {
        self.raw(b'5', name.as_bytes(), b"", 0, b"");
    }
    pub fn file(&mut self, name: &str, data: &[u8]) {
        self.raw(b'0', name.as_bytes(), b"", data.len() as u64, data);
    }
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.raw(b'2', name.as_bytes(), target.as_bytes(), 0, b"");
    }
    pub fn hardlink(&mut self, name: &str, target: &str) {
        self.raw(b'1', name.as_bytes(), target.as_bytes(), 0, b"");
    }
    /// A PAX extension header with the given records, for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = format!(" {k}=").len() + v.len() + 1;
            let mut n = rest + 1;
            while format!("{n}").len() + rest != n {
                n += 1;
            }
            body.extend_from_slice(format!("{n} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.raw(b'x', b"././@PaxHeader", b"", body.len() as u64, &body);
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.0.extend(std::iter::repeat_n(0u8, 1024));
        self.0
    }
}

/// A GNU-style header with raw name/link bytes.
pub fn header(kind: u8, name: &[u8], link: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(if kind == b'5' { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    {
        let old = h.as_old_mut();
        old.name.fill(0);
        old.name[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        old.linkname.fill(0);
        old.linkname[..link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    }
    h.set_cksum();
    h
}

/// A numeric header field: octal when it fits, else GNU base-256.
pub fn num_field(v: u64, out: &mut [u8]) {
    let n = out.len();
    let oct = format!("{v:0w$o}", w = n - 1);
    if oct.len() < n {
        out[..n - 1].copy_from_slice(oct.as_bytes());
        out[n - 1] = 0;
    } else {
        out.fill(0);
        out[0] = 0x80;
        out[n - 8..].copy_from_slice(&v.to_be_bytes());
    }
}

/// A PAX 1.0 sparse map's text: the count, then offset and length of each segment.
pub fn map_text(segs: &[(u64, u64)]) -> Vec<u8> {
    let mut t = format!("{}\n", segs.len());
    for (o, l) in segs {
        t.push_str(&format!("{o}\n{l}\n"));
    }
    t.into_bytes()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// The JSON of an amd64 image config.
pub fn config_json() -> Vec<u8> {
    br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec()
}

/// An OCI image manifest naming `config` and `layers` (given as (digest, size)).
pub fn manifest_json(config: (&str, usize), layers: &[(String, usize)]) -> Vec<u8> {
    let ls: Vec<String> = layers
        .iter()
        .map(|(d, s)| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{d}","size":{s}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
        config.0,
        config.1,
        ls.join(",")
    )
    .into_bytes()
}

/// An OCI layout archive (as `skopeo copy oci-archive:` writes) of one image whose layers are
/// the given (already compressed or plain) blobs; `extra` entries are appended to the archive.
pub fn oci_archive(layers: &[Vec<u8>], extra: impl FnOnce(&mut Tar)) -> Vec<u8> {
    let cfg = config_json();
    let ls: Vec<(String, usize)> = layers.iter().map(|l| (sha(l), l.len())).collect();
    let m = manifest_json((&sha(&cfg), cfg.len()), &ls);
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"io.containerd.image.name":"hostile:latest"}}}}]}}"#,
        sha(&m),
        m.len()
    );
    let mut t = Tar::default();
    t.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    t.file("index.json", index.as_bytes());
    t.dir("blobs/");
    t.dir("blobs/sha256/");
    for b in [cfg.clone(), m.clone()].iter().chain(layers) {
        let d = sha(b);
        t.file(&format!("blobs/sha256/{}", &d[7..]), b);
    }
    extra(&mut t);
    t.finish()
}

/// A temp "host": `store/` (the image store), `canary/` (must never change), `in/` (inputs).
type Snapshot = BTreeMap<PathBuf, (u32, u64, u64, Vec<u8>)>;

pub struct Host {
    pub dir: tempfile::TempDir,
    pub store: ImageStore,
    before: std::cell::RefCell<Snapshot>,
}

impl Host {
    pub fn new() -> Host {
        Self::with_limits(Limits::default())
    }
    pub fn with_limits(limits: Limits) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("canary");
        std::fs::create_dir_all(c.join("sub")).unwrap();
        std::fs::write(c.join("file"), b"precious").unwrap();
        std::fs::write(c.join("sub/deep"), b"deep").unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        let mut store = ImageStore::open(&dir.path().join("store")).unwrap();
        store.limits = limits;
        let h = Host {
            dir,
            store,
            before: Default::default(),
        };
        *h.before.borrow_mut() = h.outside();
        h
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn canary(&self) -> PathBuf {
        self.dir.path().join("canary")
    }
    pub fn input(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join("in").join(name);
        std::fs::write(&p, bytes).unwrap();
        // The input is ours; what changes after this is the code under test's doing.
        *self.before.borrow_mut() = self.outside();
        p
    }
    /// Everything outside `store/`: (mode, inode, links, contents) by path.
    pub fn outside(&self) -> Snapshot {
        let mut m = BTreeMap::new();
        let mut todo = vec![self.dir.path().to_path_buf()];
        let store = self.dir.path().join("store");
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == store {
                    continue;
                }
                let md = std::fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    todo.push(p.clone());
                }
                let data = if md.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                m.insert(p, (md.mode(), md.ino(), md.nlink(), data));
            }
        }
        m
    }
    /// The oracles: nothing outside the store changed, no temp or partial file is left.
    pub fn check(&self) {
        let (now, before) = (self.outside(), self.before.borrow());
        let changed: Vec<&PathBuf> = now
            .keys()
            .chain(before.keys())
            .filter(|k| now.get(*k) != before.get(*k))
            .collect();
        assert!(changed.is_empty(), "changed outside the store: {changed:?}");
        for d in ["tmp", "partial"] {
            let left: Vec<_> = std::fs::read_dir(self.dir.path().join("store").join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "left in store/{d}: {left:?}");
        }
    }
}

/// Whether a file named `name` exists at the real `/` (what the reproduced attack wrote).
pub fn at_host_root(name: &str) -> bool {
    Path::new("/").join(name).symlink_metadata().is_ok()
}
