//! `make install` into a temp DESTDIR (the Makefile's install-files step, on this build's
//! binaries) puts hutchd, hutch, the static agent beside hutchd, the systemd unit and the shell
//! completions where they belong, for PREFIX=/usr/local and /usr; `systemd-analyze verify`
//! accepts the unit as installed, without a single warning; `make uninstall` removes it all.
//! Needs `systemd-analyze` (Debian package systemd; scripts/install-deps.sh --test installs it).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn make(args: &[&str]) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_hutchd")).parent().unwrap();
    let o = Command::new("make")
        .current_dir(workspace())
        .args(["--no-print-directory", "-s"])
        .args(args)
        .arg(format!("BIN_DIR={}", bin_dir.display()))
        // Not the jobserver of a `make test` this runs under.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .output()
        .expect("make");
    assert!(
        o.status.success(),
        "make {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `systemd-analyze verify` of `unit` inside `root` (which gets a copy of this host's systemd
/// units, for the targets the unit depends on): fails on any complaint, warnings included.
fn verify(root: &Path, unit: &str) {
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).join("sysinit.target").exists())
        .expect("this host's systemd units (package systemd)");
    let dst = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&dst).unwrap();
    sh(&format!("cp -a {units}/. {}/system", dst.display()));
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && out.trim().is_empty(),
        "systemd-analyze verify {unit}: {out}"
    );
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[test]
fn make_install_and_the_systemd_unit() {
    let sa = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        sa.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install the Debian package `systemd` \
         (scripts/install-deps.sh --test does)"
    );
    ensure_agent();
    for (prefix, zsh) in [
        ("/usr/local", "share/zsh/site-functions"),
        ("/usr", "share/zsh/vendor-completions"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let destdir = format!("DESTDIR={}", r.display());
        make(&["install-files", &destdir, &format!("PREFIX={prefix}")]);
        let p = r.join(prefix.trim_start_matches('/'));
        for b in ["hutchd", "hutch", "hutch-agent"] {
            assert!(executable(&p.join("bin").join(b)), "{prefix}/bin/{b}");
        }
        // hutchd finds the agent beside itself (find_agent): the static build.
        assert_eq!(
            std::fs::read(p.join("bin/hutch-agent")).unwrap(),
            std::fs::read(agent_bin("hutch-agent")).unwrap()
        );
        let unit_rel = format!("{prefix}/lib/systemd/system/hutchd.service");
        let unit = std::fs::read_to_string(r.join(unit_rel.trim_start_matches('/'))).unwrap();
        let lines: Vec<&str> = unit.lines().map(str::trim).collect();
        for want in [
            format!("ExecStart={prefix}/bin/hutchd --data-dir /var/lib/hutch $HUTCHD_OPTS"),
            "KillMode=process".to_string(),
            "Restart=on-failure".to_string(),
            "WantedBy=multi-user.target".to_string(),
        ] {
            assert!(lines.contains(&want.as_str()), "{want} not in:\n{unit}");
        }
        assert!(!lines.iter().any(|l| l.starts_with("Delegate=")), "{unit}");
        for (f, needle) in [
            ("share/bash-completion/completions/hutch", "complete -F"),
            (&format!("{zsh}/_hutch"), "#compdef hutch"),
            (
                "share/fish/vendor_completions.d/hutch.fish",
                "complete -c hutch",
            ),
        ] {
            let s = std::fs::read_to_string(p.join(f)).unwrap_or_default();
            assert!(s.contains(needle), "{prefix}/{f}");
        }
        verify(r, &unit_rel);

        make(&["uninstall", &destdir, &format!("PREFIX={prefix}")]);
        let left = Command::new("find")
            .arg(r)
            .args(["-type", "f", "-not", "-path", "*/usr/lib/systemd/system/*"])
            .output()
            .unwrap();
        let left = String::from_utf8_lossy(&left.stdout);
        assert!(left.trim().is_empty(), "left after uninstall: {left}");
        assert!(!r.join(unit_rel.trim_start_matches('/')).exists());
    }
}
