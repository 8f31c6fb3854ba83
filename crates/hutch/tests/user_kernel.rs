//! `hutchd --kernel PATH --kernel-modules DIR` boots a kernel the user supplies, without
//! downloading one; a missing kernel stops hutchd with a clear error.

mod common;
use common::*;

#[test]
fn user_supplied_kernel_boots_and_nothing_is_downloaded() {
    // The distro kernel fetched into the shared test cache stands in for "the user's kernel".
    let release = {
        let d = Daemon::start(&[]);
        d.json(&["status"])["kernel"].as_str().unwrap().to_string()
    };
    let kdir = workspace()
        .join("target/hutch-test-boot/kernel")
        .join(&release);
    let vmlinuz = kdir.join(format!("boot/vmlinuz-{release}"));
    let modules = kdir.join(format!("lib/modules/{release}"));
    let cache = tempfile::tempdir().unwrap();

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_hutchd"))
        .args([
            "--data-dir",
            cache.path().join("d").to_str().unwrap(),
            "--kernel",
            "/no/such/vmlinuz",
            "--network",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/vmlinuz"));

    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path());
    let d = Daemon::start(&[
        "--kernel",
        vmlinuz.to_str().unwrap(),
        "--kernel-modules",
        modules.to_str().unwrap(),
        "--boot-cache",
        cache.path().to_str().unwrap(),
    ]);
    d.import_busybox(&layout);
    d.ok(&["new", "--image", "busybox", "--name", "k"]);
    assert_eq!(d.ok(&["exec", "k", "--", "uname", "-r"]).trim(), release);
    assert!(
        !cache.path().join("kernel").exists(),
        "no kernel was downloaded"
    );
    let initrds = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("initramfs-"))
        .count();
    assert_eq!(initrds, 1);
    d.ok(&["rm", "k"]);
}
