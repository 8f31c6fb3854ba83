//! Images against real registries: pull by tag and digest, multi-arch indexes, auth, bad blobs,
//! resume, concurrent pulls, whiteouts across layers, commit, push, and the result read back by
//! skopeo and umoci; `hutch new` pulling a missing image with progress. Three VM boots.

mod common;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The CLI's stdout and stderr as one stream, in the order written; whether it succeeded.
fn merged(d: &Daemon, args: &[&str]) -> (bool, String) {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 2>&1")
        .arg(env!("CARGO_BIN_EXE_hutch"))
        .arg("--data-dir")
        .arg(d.data())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
    )
}

/// NDJSON events of a pull through the API.
fn api_pull(d: &Daemon, body: Value) -> Vec<Value> {
    let (st, b) = d
        .api_raw(
            "POST",
            "/api/v1/images/pull",
            Some(body.to_string().as_bytes()),
            "application/json",
        )
        .unwrap();
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    String::from_utf8_lossy(&b)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn add_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

fn read_blob(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap()
}

/// Adds tag `name` to the layout: an image index of the `bb` image for the given platforms
/// (the same layers, with configs saying each architecture).
fn add_index(layout: &Path, name: &str, arches: &[&str]) -> String {
    let idx: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let bb = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "bb")
        .unwrap()
        .clone();
    let manifest = read_blob(layout, bb["digest"].as_str().unwrap());
    let mut amd64 = String::new();
    let mut entries = Vec::new();
    for a in arches {
        let mut cfg = read_blob(layout, manifest["config"]["digest"].as_str().unwrap());
        cfg["architecture"] = json!(a);
        let (cd, cs) = add_blob(layout, &serde_json::to_vec(&cfg).unwrap());
        let mut m = manifest.clone();
        m["config"]["digest"] = json!(cd);
        m["config"]["size"] = json!(cs);
        let (md, ms) = add_blob(layout, &serde_json::to_vec(&m).unwrap());
        if *a == "amd64" {
            amd64 = md.clone();
        }
        entries.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "platform": {"architecture": a, "os": "linux"}}));
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
    let (id, is) = add_blob(layout, &serde_json::to_vec(&index).unwrap());
    let mut top = idx.clone();
    top["manifests"].as_array_mut().unwrap().push(
        json!({"mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": id, "size": is, "annotations": {"org.opencontainers.image.ref.name": name}}),
    );
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    amd64
}

#[test]
fn registry_pull_commit_push() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A 4-layer image: busybox, then files, then deletions (whiteouts) and a hardlink.
    let layout = busybox_layout(w);
    sh(&format!(
        r#"set -e; cd {w}
step() {{ umoci unpack --image oci:bb b >/dev/null; r=b/rootfs; eval "$1"; umoci repack --image oci:bb b >/dev/null; rm -rf b; }}
step 'mkdir -p $r/etc $r/opt/keep $r/opt/gone $r/data $r/run/app; echo a > $r/etc/a; echo b > $r/etc/b; echo x > $r/opt/keep/x; echo y > $r/opt/gone/y; echo seed > $r/run/app/f; chown -R 65534:65534 $r/run/app; chmod 750 $r/run/app'
step 'rm $r/etc/a; rm -r $r/opt/gone; echo c > $r/etc/c; echo h > $r/data/h1; ln $r/data/h1 $r/data/h2'
step 'rm $r/etc/c'
mkdir big && {ws}/scripts/make-test-image.sh big 8 && mkdir bad && {ws}/scripts/make-test-image.sh bad 1 && mkdir cut && {ws}/scripts/make-test-image.sh cut 1
"#,
        w = w.display(),
        ws = workspace().display()
    ));
    let amd64 = add_index(&layout, "multi", &["arm64", "amd64"]);
    add_index(&layout, "armonly", &["arm64"]);
    let reg = TestRegistry::start(None);
    let areg = TestRegistry::start(Some(("alice", "s3cret")));
    reg.push(&layout, "bb", "team/app:1", None);
    reg.push(&layout, "multi", "multi:1", None);
    reg.push(&layout, "armonly", "armonly:1", None);
    reg.push(&w.join("big/oci"), "bb", "big:1", None);
    reg.push(&w.join("bad/oci"), "bb", "bad:1", None);
    reg.push(&w.join("cut/oci"), "bb", "cut:1", None);
    areg.push(&layout, "bb", "team/app:1", Some("alice:s3cret"));
    let r = &reg.addr;
    let d = Daemon::start(&[]);

    // By tag, then by digest: the same image; the second downloads nothing. A loopback
    // registry speaks plain HTTP without --insecure.
    let img = d.json(&["image", "pull", &format!("{r}/team/app:1")]);
    assert_eq!(img["name"], format!("{r}/team/app:1"));
    assert_eq!(img["layers"].as_array().unwrap().len(), 4);
    let digest = img["digest"].as_str().unwrap().to_string();
    let evs = api_pull(
        &d,
        json!({"reference": format!("{r}/team/app@{digest}"), "insecure": true}),
    );
    assert_eq!(evs.last().unwrap()["image"]["digest"], json!(digest));
    assert!(
        evs.iter()
            .filter(|e| e["type"] == "blob")
            .all(|e| e["cached"] == true),
        "{evs:?}"
    );
    assert!(!evs.iter().any(|e| e["type"] == "progress"));
    // A multi-arch index: linux/amd64 is picked; an arm64-only image is refused.
    let m = d.json(&["image", "pull", "--insecure", &format!("{r}/multi:1")]);
    assert_eq!(m["digest"], json!(amd64));
    let o = d.hutch(&["image", "pull", "--insecure", &format!("{r}/armonly:1")]);
    assert!(stderr(&o).contains("linux/arm64"), "{}", stderr(&o));

    // Auth: missing and wrong credentials fail clearly; --creds and the docker config work.
    let a = &areg.addr;
    let o = d.hutch(&["image", "pull", "--insecure", &format!("{a}/team/app:1")]);
    assert!(
        stderr(&o).contains("requires credentials"),
        "{}",
        stderr(&o)
    );
    let o = d.hutch(&[
        "image",
        "pull",
        "--insecure",
        "--creds",
        "alice:nope",
        &format!("{a}/team/app:1"),
    ]);
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    d.ok(&[
        "image",
        "pull",
        "--insecure",
        "--creds",
        "alice:s3cret",
        &format!("{a}/team/app:1"),
    ]);
    let dc = w.join("dockercfg");
    std::fs::create_dir(&dc).unwrap();
    std::fs::write(
        dc.join("config.json"),
        json!({"auths": {a.clone(): {"auth": "YWxpY2U6czNjcmV0"}}}).to_string(),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hutch"))
        .args([
            "--data-dir",
            d.data().to_str().unwrap(),
            "image",
            "pull",
            "--insecure",
            "--name",
            "via-config",
            &format!("{a}/team/app:1"),
        ])
        .env("DOCKER_CONFIG", &dc)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Bad registries and bad blobs: clear errors, nothing half-written, earlier images intact.
    let images_before = d.json(&["image", "ls"]);
    let o = d.hutch(&["image", "pull", "--insecure", "127.0.0.1:1/x:1"]);
    assert!(
        stderr(&o).contains("cannot reach registry"),
        "{}",
        stderr(&o)
    );
    let o = d.hutch(&[
        "image",
        "pull",
        "--insecure",
        &format!("{r}/nothing/here:1"),
    ]);
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
    let bad_layer = |name: &str| -> String {
        let m = read_blob(
            &w.join(name).join("oci"),
            {
                let idx: Value = serde_json::from_slice(
                    &std::fs::read(w.join(name).join("oci/index.json")).unwrap(),
                )
                .unwrap();
                idx["manifests"][0]["digest"].as_str().unwrap().to_string()
            }
            .as_str(),
        );
        m["layers"][1]["digest"].as_str().unwrap().to_string()
    };
    let bad = bad_layer("bad");
    let f = reg.blob_file(&bad);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let o = d.hutch(&["image", "pull", "--insecure", &format!("{r}/bad:1")]);
    assert!(
        stderr(&o).contains("does not match its digest"),
        "{}",
        stderr(&o)
    );
    let cut = bad_layer("cut");
    let f = reg.blob_file(&cut);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = d.hutch(&["image", "pull", "--insecure", &format!("{r}/cut:1")]);
    assert!(!o.status.success());
    let blobs = d.data().join("images/blobs/sha256");
    assert!(!blobs.join(bad.trim_start_matches("sha256:")).exists());
    assert!(!blobs.join(cut.trim_start_matches("sha256:")).exists());
    assert_eq!(d.json(&["image", "ls"]), images_before);

    // An interrupted pull resumes: half of the big layer is already on disk.
    let big = bad_layer("big");
    let blob = std::fs::read(reg.blob_file(&big)).unwrap();
    std::fs::write(
        d.data()
            .join("images/partial")
            .join(big.trim_start_matches("sha256:")),
        &blob[..blob.len() / 2],
    )
    .unwrap();
    let evs = api_pull(
        &d,
        json!({"reference": format!("{r}/big:1"), "insecure": true}),
    );
    let ev = evs
        .iter()
        .find(|e| e["type"] == "blob" && e["digest"] == json!(big))
        .unwrap();
    assert_eq!(ev["resumed_from"], json!(blob.len() / 2), "{evs:?}");
    assert_eq!(evs.last().unwrap()["type"], "done", "{evs:?}");

    // Concurrent pulls of one image do the work once.
    d.ok(&["image", "rm", &format!("{r}/big:1")]);
    let gc = d.json(&["image", "gc"]);
    assert!(gc["blobs_removed"].as_u64().unwrap() >= 2, "{gc}");
    let runs: Vec<Vec<Value>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    api_pull(
                        &d,
                        json!({"reference": format!("{r}/big:1"), "insecure": true}),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut downloaded: Vec<&str> = runs
        .iter()
        .flatten()
        .filter(|e| e["type"] == "blob" && e["cached"] == false)
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    downloaded.sort();
    let n = downloaded.len();
    downloaded.dedup();
    assert_eq!(n, downloaded.len(), "a blob was fetched twice: {runs:?}");
    // The busybox layer may already be there (test images built in the same second share it);
    // the big layer was garbage-collected and must have been fetched exactly once.
    assert!(downloaded.contains(&big.as_str()), "{runs:?}");
    assert!(runs.iter().all(|ev| ev.last().unwrap()["type"] == "done"));

    // Whiteouts across layers and hardlinks, seen from inside a VM.
    d.ok(&["new", "--image", &format!("{r}/team/app:1"), "--name", "w"]);
    let ls = d.ok(&[
        "exec",
        "w",
        "--",
        "sh",
        "-c",
        "ls /etc; ls /opt; busybox stat -c %h /data/h1 /data/h2; cat /etc/b",
    ]);
    // (hosts and resolv.conf: written by the agent from the VM's network at boot.)
    assert_eq!(
        ls, "b\ngroup\nhosts\npasswd\nresolv.conf\nkeep\n2\n2\nb\n",
        "{ls}"
    );
    // The tmpfs on /run starts with what the image has there, owners and modes kept.
    let run = d.ok(&[
        "exec",
        "w",
        "--",
        "sh",
        "-c",
        "stat -c '%u %a' /run /run/app; cat /run/app/f",
    ]);
    assert_eq!(run, "0 1777\n65534 750\nseed\n", "{run}");
    // Commit the VM's changes (a new file, a deleted image file) and push them.
    d.ok(&[
        "exec",
        "w",
        "--",
        "sh",
        "-c",
        "echo mine > /root/new && rm /etc/b",
    ]);
    let c = d.json(&[
        "commit",
        "w",
        &format!("{r}/team/app:2"),
        "--push",
        "-m",
        "test",
    ]);
    assert_eq!(c["pushed"], format!("{r}/team/app:2"));
    assert_eq!(c["layers"].as_array().unwrap().len(), 5);
    // `hutch new` pulls a missing image first, with progress, as `docker run` does: the
    // committed layer is gone from the store, the other four are already there.
    d.ok(&["image", "rm", &format!("{r}/team/app:2")]);
    d.json(&["image", "gc"]);
    let (ok, out) = merged(
        &d,
        &["new", "--image", &format!("{r}/team/app:2"), "--name", "w2"],
    );
    assert!(ok, "{out}");
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("no {s:?} in:\n{out}"));
    let (missing, pulled, vm) = (
        at(&format!("Unable to find image '{r}/team/app:2' locally")),
        at(&format!(
            "pulled {r}/team/app:2 ({})",
            c["digest"].as_str().unwrap()
        )),
        at("Name:    w2"),
    );
    assert!(out.matches(": already present").count() == 4, "{out}");
    assert!(out.matches(": downloaded").count() == 1, "{out}");
    for p in [
        at("5 layers"),
        at(": downloaded"),
        at("building root filesystem"),
    ] {
        assert!(missing < p && p < pulled, "{out}");
    }
    assert!(pulled < vm, "{out}");
    // A missing image whose reference names no registry is not pulled: a clear message.
    let (ok, out) = merged(&d, &["new", "--image", "nosuch"]);
    assert!(!ok && out.contains("image \"nosuch\" not found"), "{out}");
    assert!(
        out.contains("names a registry") && !out.contains("Unable"),
        "{out}"
    );
    assert_eq!(
        d.ok(&["exec", "w2", "--", "sh", "-c", "cat /root/new; ls /etc"]),
        "mine\ngroup\nhosts\npasswd\nresolv.conf\n"
    );
    // skopeo and umoci accept what was pushed.
    let o = std::process::Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{r}/team/app:2"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let si: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(si["Digest"], c["digest"]);
    sh(&format!(
        "set -e; cd {w}; skopeo copy --src-tls-verify=false docker://{r}/team/app:2 oci:back:app >/dev/null; umoci unpack --image back:app ub >/dev/null; test \"$(cat ub/rootfs/root/new)\" = mine; test ! -e ub/rootfs/etc/b; test -e ub/rootfs/etc/passwd",
        w = w.display()
    ));
    // Images in use survive garbage collection; deleting the VMs leaves nothing running.
    d.json(&["image", "gc"]);
    d.ok(&["rm", "w"]);
    d.ok(&["rm", "w2"]);
    assert!(d.qemu_pids().is_empty());
    d.ok(&["new", "--image", &format!("{r}/team/app:2"), "--name", "w3"]);
    d.ok(&["rm", "w3"]);
}
