//! Unknown SSH keys under each `--signup` mode, with the real OpenSSH client: closed refuses
//! them; open makes an account at first login (default quota, a bounded number per address);
//! invite lets a new key do nothing but redeem a one-time code an admin made, once. No VM boots.

mod common;
use common::ssh_client::*;
use common::*;
use serde_json::Value;

fn daemon(mode: &str, admin: &std::path::Path) -> (Daemon, Ssh) {
    let port = free_port();
    let d = Daemon::start(&[
        "--ssh-listen",
        &format!("127.0.0.1:{port}"),
        "--admin-keys",
        &format!("{}.pub", admin.display()),
        "--signup",
        mode,
    ]);
    (d, Ssh { port })
}

#[test]
fn closed_open_and_invite_signups() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let admin = keygen(w, "admin", &["-t", "ed25519"]);
    let keys: Vec<_> = (0..7)
        .map(|i| keygen(w, &format!("k{i}"), &["-t", "ed25519"]))
        .collect();

    // closed (the default): an unknown key is refused.
    let (d, s) = daemon("closed", &admin);
    let (_, _, c) = text(&s.run(&keys[0], "x", &["whoami"], None, false));
    assert_eq!(c, 255, "ssh refuses the login");
    drop(d);

    // open: the first login makes an account with the default quota, named from the key.
    let (d, s) = daemon("open", &admin);
    let (so, se, c) = text(&s.run(&keys[0], "x", &["whoami"], None, false));
    assert_eq!(c, 0, "{se}");
    assert!(so.contains("u-"), "{so}");
    let (so, _, c) = text(&s.run(&keys[0], "x", &["quota", "--json"], None, false));
    assert_eq!(c, 0);
    let q: Value = serde_json::from_str(&so).unwrap();
    assert_eq!(q["quota"]["vms"], 20, "{q}");
    // The same key again is the same account, not a new one.
    let (so2, _, _) = text(&s.run(&keys[0], "x", &["whoami"], None, false));
    let (so1, _, _) = text(&s.run(&keys[0], "x", &["whoami"], None, false));
    assert_eq!(so1, so2);
    // At most five new accounts from one address an hour: key 0 made one, 1-4 make four more,
    // key 5 is refused.
    for k in &keys[1..5] {
        let (_, se, c) = text(&s.run(k, "x", &["whoami"], None, false));
        assert_eq!(c, 0, "{se}");
    }
    let (_, _, c) = text(&s.run(&keys[5], "x", &["whoami"], None, false));
    assert_eq!(
        c, 255,
        "the sixth sign-up from one address within an hour is refused"
    );
    drop(d);

    // invite: a new key may only redeem a code; codes work once; bad codes change nothing.
    let (d, s) = daemon("invite", &admin);
    let newbie = &keys[6];
    let (_, se, c) = text(&s.run(newbie, "x", &["ls"], None, false));
    assert_eq!(c, 1);
    assert!(
        se.contains("has no account") && se.contains("signup CODE"),
        "{se}"
    );
    let (_, se, c) = text(&s.run(newbie, "x", &["signup", "0123456789abcdef"], None, false));
    assert_eq!(c, 1);
    assert!(se.contains("no such invite"), "{se}");
    // Only admins make invites.
    let pubkey = std::fs::read(format!("{}.pub", keys[0].display())).unwrap();
    let (_, se, c) = text(&s.run(&admin, "admin", &["adduser", "alice"], Some(&pubkey), false));
    assert_eq!(c, 0, "{se}");
    let (_, se, c) = text(&s.run(&keys[0], "alice", &["invite"], None, false));
    assert_eq!(c, 1);
    assert!(se.contains("only admins"), "{se}");
    let (so, se, c) = text(&s.run(&admin, "admin", &["invite", "--ttl", "2"], None, false));
    assert_eq!(c, 0, "{se}");
    let code = so.lines().next().unwrap().trim().to_string();
    assert_eq!(code.len(), 32, "{so}");
    // A taken name keeps the code good; a free name redeems it.
    // A name that is no account name is refused and keeps the code good.
    for bad in ["../evil", "Admin", "x/y", &"a".repeat(64)] {
        let (_, se, c) = text(&s.run(newbie, "x", &["signup", &code, bad], None, false));
        assert_eq!(c, 1, "{bad}");
        assert!(se.contains("account name"), "{bad}: {se}");
    }
    let (_, se, c) = text(&s.run(newbie, "x", &["signup", &code, "alice"], None, false));
    assert_eq!(c, 1);
    assert!(se.contains("exists"), "{se}");
    let (so, se, c) = text(&s.run(newbie, "x", &["signup", &code, "carol"], None, false));
    assert_eq!(c, 0, "{se}");
    assert!(so.contains("welcome, carol"), "{so}");
    let (so, _, c) = text(&s.run(newbie, "x", &["whoami"], None, false));
    assert_eq!(c, 0);
    assert!(so.contains("carol"), "{so}");
    // Used once: another new key cannot redeem it again.
    let (_, se, c) = text(&s.run(&keys[5], "x", &["signup", &code], None, false));
    assert_eq!(c, 1);
    assert!(se.contains("no such invite"), "{se}");
    drop(d);
}
