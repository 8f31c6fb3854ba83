//! Bad input gets a clear error and changes nothing; image archive formats; TCP auth.

mod common;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn err_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A layer tarball. `raw` names are written as-is (so `../x` can be made).
fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        let n = &mut h.as_old_mut().name;
        n[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A `docker save` tarball with the given layers and architecture.
fn docker_save(path: &Path, tag: &str, arch: &str, layers: &[Vec<u8>]) {
    let config =
        json!({"architecture": arch, "os": "linux", "config": {"Env": ["X=1"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": []}})
        .to_string();
    let cfg_name = format!("{}.json", hex::encode(Sha256::digest(config.as_bytes())));
    let mut files: Vec<(String, Vec<u8>)> = vec![(cfg_name.clone(), config.into_bytes())];
    let mut lnames = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("l{i}/layer.tar");
        files.push((n.clone(), l.clone()));
        lnames.push(n);
    }
    let manifest = json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": lnames}]).to_string();
    files.push(("manifest.json".into(), manifest.into_bytes()));
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (n, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, n, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

fn image_names(d: &Daemon) -> Vec<String> {
    d.json(&["image", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect()
}

fn rootfs_count(d: &Daemon) -> usize {
    std::fs::read_dir(d.data().join("images/rootfs"))
        .map(|r| r.count())
        .unwrap_or(0)
}

fn tmp_left(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.data().join("images/tmp"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn images_and_bad_input() {
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    // A main process for `--run`.
    sh(&format!(
        "cd {} && umoci config --image oci:bb --config.cmd sh --config.cmd -c --config.cmd 'echo main-started-$HOSTNAME; exec sleep 100000' >/dev/null",
        work.path().display()
    ));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&[
        "--listen",
        &addr,
        "--max-image-entries",
        "5000",
        "--max-image-mib",
        "64",
    ]);

    // A corrupt blob in an OCI layout (before its good twin is in the store).
    let corrupt = work.path().join("corrupt");
    std::process::Command::new("cp")
        .arg("-r")
        .arg(&layout)
        .arg(&corrupt)
        .status()
        .unwrap();
    let idx: Value =
        serde_json::from_slice(&std::fs::read(corrupt.join("index.json")).unwrap()).unwrap();
    let mdigest = idx["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(corrupt.join("blobs/sha256").join(&mdigest)).unwrap(),
    )
    .unwrap();
    let ldigest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let lp = corrupt.join("blobs/sha256").join(&ldigest);
    let mut bytes = std::fs::read(&lp).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&lp, bytes).unwrap();
    let o = d.hutch(&[
        "image",
        "import",
        corrupt.to_str().unwrap(),
        "--name",
        "corrupt",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not match its digest"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(image_names(&d), Vec::<String>::new());
    assert_eq!(tmp_left(&d), Vec::<String>::new());

    // Image formats: OCI layout dir, oci-archive written by skopeo, docker save (with a
    // whiteout across layers).
    d.import_busybox(&layout);
    let archive = work.path().join("bb-oci.tar");
    let st = std::process::Command::new("skopeo")
        .args([
            "copy",
            &format!("oci:{}:bb", layout.display()),
            &format!("oci-archive:{}", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let img = d.json(&[
        "image",
        "import",
        archive.to_str().unwrap(),
        "--name",
        "bb-archive:1",
    ]);
    let img_dir = d.json(&["image", "inspect", "busybox"]);
    assert_eq!(img["digest"], img_dir["digest"], "same image, same digest");
    assert_eq!(rootfs_count(&d), 1, "the rootfs is built once per digest");
    let ds = work.path().join("saved.tar");
    docker_save(
        &ds,
        "saved:v1",
        "amd64",
        &[
            layer(&[("a", b"1"), ("b", b"2")]),
            layer(&[(".wh.a", b""), ("c", b"3")]),
        ],
    );
    let saved = d.json(&["image", "import", ds.to_str().unwrap()]);
    assert_eq!(saved["name"], "saved:v1");
    assert_eq!(saved["config"]["env"], json!(["X=1"]));
    assert_eq!(saved["layers"].as_array().unwrap().len(), 2);

    let before = image_names(&d);
    let roots = rootfs_count(&d);
    // A layer escaping the root.
    let evil = work.path().join("evil.tar");
    docker_save(
        &evil,
        "evil:1",
        "amd64",
        &[layer(&[("../../../tmp/hutch-evil", b"x")])],
    );
    let o = d.hutch(&["image", "import", evil.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("escapes the root"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!Path::new("/tmp/hutch-evil").exists());
    // A layer bomb: more entries than the configured limit.
    let many: Vec<(String, Vec<u8>)> = (0..6000).map(|i| (format!("f{i}"), Vec::new())).collect();
    let refs: Vec<(&str, &[u8])> = many
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let bomb = work.path().join("bomb.tar");
    docker_save(&bomb, "bomb:1", "amd64", &[layer(&refs)]);
    let o = d.hutch(&["image", "import", bomb.to_str().unwrap()]);
    assert!(
        stderr_of(&o).contains("more than 5000 entries"),
        "{}",
        stderr_of(&o)
    );
    // Another architecture.
    let arm = work.path().join("arm.tar");
    docker_save(&arm, "arm:1", "arm64", &[layer(&[("a", b"1")])]);
    let o = d.hutch(&["image", "import", arm.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("linux/arm64"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Not an archive at all, and a truncated one.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, b"definitely not a tarball").unwrap();
    assert_eq!(
        d.hutch(&["image", "import", junk.to_str().unwrap()])
            .status
            .code(),
        Some(1)
    );
    let full = std::fs::read(&ds).unwrap();
    let cut = work.path().join("cut.tar");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    assert_eq!(
        d.hutch(&["image", "import", cut.to_str().unwrap(), "--name", "cut"])
            .status
            .code(),
        Some(1)
    );
    // Nothing changed.
    assert_eq!(image_names(&d), before);
    assert_eq!(rootfs_count(&d), roots);
    assert_eq!(tmp_left(&d), Vec::<String>::new());

    // API-level bad input: JSON errors with codes, nothing created.
    let (s, v) = d
        .api("POST", "/api/v1/sandboxes", Some("{not json"))
        .unwrap();
    assert_eq!((s, err_code(&v)), (400, "invalid_argument"), "{v}");
    let (s, v) = d
        .api(
            "POST",
            "/api/v1/sandboxes",
            Some(r#"{"image":"busybox","bogus":1}"#),
        )
        .unwrap();
    assert_eq!((s, err_code(&v)), (400, "invalid_argument"), "{v}");
    let (s, v) = d
        .api("POST", "/api/v1/sandboxes", Some(r#"{"image":"nope"}"#))
        .unwrap();
    assert_eq!((s, err_code(&v)), (404, "not_found"), "{v}");
    for body in [
        r#"{"image":"busybox","name":"Bad_Name"}"#,
        r#"{"image":"busybox","vcpus":0}"#,
        r#"{"image":"busybox","vcpus":100000}"#,
        r#"{"image":"busybox","mem_mib":0}"#,
        r#"{"image":"busybox","mem_mib":100000000}"#,
    ] {
        let (s, v) = d.api("POST", "/api/v1/sandboxes", Some(body)).unwrap();
        assert_eq!((s, err_code(&v)), (400, "invalid_argument"), "{body}: {v}");
    }
    let (s, v) = d
        .api(
            "POST",
            "/api/v1/sandboxes/ghost/exec",
            Some(r#"{"argv":["true"]}"#),
        )
        .unwrap();
    assert_eq!((s, err_code(&v)), (404, "not_found"));
    let (s, v) = d.api("GET", "/api/v1/nothing-here", None).unwrap();
    assert_eq!((s, err_code(&v)), (404, "not_found"));
    // A path parameter that is not UTF-8 once decoded: a JSON error too (was axum's plain text).
    let (s, v) = d.api("GET", "/api/v1/images/%FF", None).unwrap();
    assert_eq!((s, err_code(&v)), (400, "invalid_argument"), "{v}");
    let o = d.hutch(&["new", "--image", "busybox", "--vcpu", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("vcpus"));
    assert_eq!(d.json(&["ls"]), json!([]));
    assert!(d.qemu_pids().is_empty());
    let (s, v) = d.api("GET", "/api/v1/openapi.json", None).unwrap();
    assert_eq!(s, 200);
    assert!(v["paths"]["/api/v1/sandboxes/{name}/exec"].is_object());

    // Concurrent creates with one name: exactly one wins, the others get 409.
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let d = &d;
                s.spawn(move || {
                    d.api(
                        "POST",
                        "/api/v1/sandboxes",
                        Some(r#"{"image":"bb-archive:1","name":"same","run":true}"#),
                    )
                    .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wins = results.iter().filter(|(s, _)| *s == 201).count();
    let conflicts = results
        .iter()
        .filter(|(s, v)| *s == 409 && err_code(v) == "conflict")
        .count();
    assert_eq!((wins, conflicts), (1, 2), "{results:?}");
    assert_eq!(d.qemu_pids().len(), 1);
    // The image's Cmd runs as the main process, output on the console.
    let vm = d.json(&["describe", "same"]);
    assert!(vm["main_pid"].as_i64().is_some(), "{vm}");
    let logs = wait_until(std::time::Duration::from_secs(10), || {
        let l = d.ok(&["logs", "same"]);
        l.contains("main-started-same").then_some(l)
    });
    assert!(logs.is_some(), "{}", d.ok(&["logs", "same"]));
    let ps = d.ok(&[
        "exec",
        "same",
        "--",
        "sh",
        "-c",
        "cat /proc/[0-9]*/cmdline | tr '\\0' ' ' | grep -o 'sleep 100000' | head -1",
    ]);
    assert_eq!(ps.trim(), "sleep 100000");
    // Bad query strings are JSON errors (found by tests/api_fuzz.rs; were axum's plain text).
    for path in [
        "/api/v1/sandboxes/same/logs?tail=x",
        "/api/v1/sandboxes/same/files",
    ] {
        let (s, v) = d.api("GET", path, None).unwrap();
        assert_eq!((s, err_code(&v)), (400, "invalid_argument"), "{path}: {v}");
    }
    // An image in use cannot be deleted.
    let o = d.hutch(&["image", "rm", "bb-archive:1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("used by"));

    // TCP needs the bearer token.
    let token = std::fs::read_to_string(d.data().join("api-token")).unwrap();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let (st, _) = http(
        &mut s,
        "GET",
        "/api/v1/sandboxes",
        None,
        "application/json",
        None,
    )
    .unwrap();
    assert_eq!(st, 401);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let (st, _) = http(
        &mut s,
        "GET",
        "/api/v1/sandboxes",
        None,
        "application/json",
        Some("wrong"),
    )
    .unwrap();
    assert_eq!(st, 401);
    let url = format!("http://{addr}");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args([
            "--url",
            &url,
            "--token",
            token.trim(),
            "exec",
            "same",
            "--",
            "echo",
            "over tcp",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "over tcp\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Deleting a running VM stops it first and leaves nothing.
    d.ok(&["rm", "same"]);
    assert!(d.qemu_pids().is_empty());
    assert_eq!(std::fs::read_dir(d.data().join("vms")).unwrap().count(), 0);
    d.ok(&["image", "rm", "bb-archive:1"]);
    d.ok(&["image", "rm", "busybox"]);
    assert_eq!(rootfs_count(&d), 1, "saved:v1 keeps its rootfs");
    let o = d.hutch(&["image", "rm", "busybox"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));
}
