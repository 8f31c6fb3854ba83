#!/usr/bin/env python3
"""A scripted session with the official, unmodified E2B Python SDK (sync API, e2b 2.63.0) against
hutchd's E2B-compatible server.

    E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT \\
    E2B_API_KEY=$(cat DATA_DIR/api-token) target/e2b-sdk/venv/bin/python tests/e2b/session_sync.py

The SDK reads the three variables itself. Optional: E2B_TEST_TEMPLATE (default: none given, so
the SDK asks for E2B's default template `base`), E2B_TEST_REQUEST_TIMEOUT (seconds, default 120:
TCG guests are slow). Each step prints `ok N ...` as it passes; the first failed check prints
`FAIL: ...` and exits 1 (2 for a missing variable). One sandbox is booted; pause and connect
resume that same one.
"""

import hashlib
import os
import sys
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone

try:
    import httpx

    from e2b import (
        AuthenticationException,
        CommandExitException,
        FileNotFoundException,
        FileType,
        NotFoundException,
        PtySize,
        Sandbox,
        SandboxNotFoundException,
        SandboxQuery,
        SandboxState,
        TimeoutException,
    )
except ImportError as e:  # pragma: no cover
    print(f"FAIL: the e2b SDK does not import ({e}): run scripts/install-e2b-sdks.sh", flush=True)
    sys.exit(1)

for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
    if not os.environ.get(var):
        print(f"FAIL: {var} is not set", flush=True)
        sys.exit(2)

TEMPLATE = os.environ.get("E2B_TEST_TEMPLATE") or None
EXPECT_TEMPLATE = TEMPLATE or "base"
RT = float(os.environ.get("E2B_TEST_REQUEST_TIMEOUT") or "120")
RUN = uuid.uuid4().hex[:12]
T0 = time.monotonic()
_n = 0


class Failed(Exception):
    pass


def ok(msg: str) -> None:
    global _n
    _n += 1
    print(f"ok {_n} [{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def check(cond, what: str, got=None) -> None:
    if not cond:
        raise Failed(what + ("" if got is None else f" (got {got!r})"))


def eq(got, want, what: str) -> None:
    if got != want:
        raise Failed(f"{what}: expected {want!r}, got {got!r}")


def raises(exc, fn, what: str):
    """Runs fn; it must raise exc (an SDK exception class). Returns the exception."""
    try:
        r = fn()
    except exc as e:
        return e
    except Exception as e:
        raise Failed(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}")
    raise Failed(f"{what}: expected {exc.__name__}, got no exception but {r!r}")


def wait_for(fn, what: str, timeout: float = 20.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not seen within {timeout:.0f} s")
        time.sleep(every)


def bad_input() -> None:
    e = raises(
        AuthenticationException,
        lambda: Sandbox.create(TEMPLATE, api_key="e2b_" + "0" * 40, request_timeout=RT),
        "create with a wrong API key",
    )
    ok(f"a wrong API key raises AuthenticationException ({e})")
    e = raises(
        AuthenticationException,
        lambda: Sandbox.list(api_key="not-a-key", request_timeout=RT).next_items(),
        "list with a wrong API key",
    )
    ok("list with a wrong API key raises AuthenticationException")
    missing = "i" + uuid.uuid4().hex[:19]
    e = raises(
        NotFoundException,
        lambda: Sandbox.connect(missing, request_timeout=RT),
        "connect to an unknown sandbox id",
    )
    check(isinstance(e, SandboxNotFoundException), "connect: SandboxNotFoundException", type(e))
    e = raises(
        SandboxNotFoundException,
        lambda: Sandbox.get_info(missing, request_timeout=RT),
        "get_info of an unknown sandbox id",
    )
    eq(Sandbox.kill(missing, request_timeout=RT), False, "kill of an unknown sandbox id")
    raises(
        SandboxNotFoundException,
        lambda: Sandbox.set_timeout(missing, 60, request_timeout=RT),
        "set_timeout of an unknown sandbox id",
    )
    ok("an unknown sandbox id: connect/get_info/set_timeout raise NotFound, kill returns False")


def commands(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo hello; echo oops >&2")
    eq((r.stdout, r.stderr, r.exit_code), ("hello\n", "oops\n", 0), "foreground run")
    ok("commands.run: stdout, stderr, exit code 0")

    r = sbx.commands.run('echo "$0"; id -u; pwd; echo "$HOME"; shopt -q login_shell && echo login')
    lines = r.stdout.splitlines()
    check(lines and lines[0].endswith("bash"), "commands run in bash", r.stdout)
    eq(lines[1:], ["1000", "/home/user", "/home/user", "login"], "default user: uid, cwd, HOME, login shell")
    r = sbx.commands.run("id -u; pwd; echo $HOME", user="root")
    eq(r.stdout, "0\n/root\n/root\n", 'user="root"')
    ok("the default user is uid 1000 in /home/user; user=root is uid 0 in /root")

    r = sbx.commands.run('echo "$SBX_ENV|$CMD_ENV"', envs={"CMD_ENV": "per-command"})
    eq(r.stdout, "sandbox-wide|per-command\n", "sandbox envs and command envs")
    r = sbx.commands.run('echo "$SBX_ENV"', envs={"SBX_ENV": "overridden"})
    eq(r.stdout, "overridden\n", "a command env overrides the sandbox-wide one")
    r = sbx.commands.run("pwd", cwd="/tmp")
    eq(r.stdout, "/tmp\n", "cwd")
    ok("envs (sandbox-wide, per command, override) and cwd")

    outs, errs, stamps = [], [], []

    def on_out(s):
        outs.append(s)
        stamps.append(time.monotonic())

    r = sbx.commands.run(
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.7; done",
        on_stdout=on_out,
        on_stderr=errs.append,
    )
    end = time.monotonic()
    eq("".join(outs), "out1\nout2\nout3\n", "on_stdout chunks")
    eq("".join(errs), "err1\nerr2\nerr3\n", "on_stderr chunks")
    eq(r.stdout, "out1\nout2\nout3\n", "stdout kept beside the callbacks")
    check(end - stamps[0] > 1.0, "output streams while the command runs (first chunk came at the end)",
          f"first chunk {end - stamps[0]:.2f} s before the end")
    ok("on_stdout/on_stderr stream while the command runs")

    e = raises(
        CommandExitException,
        lambda: sbx.commands.run("echo before; echo bad >&2; exit 3"),
        "a command exiting 3",
    )
    eq((e.exit_code, e.stdout, e.stderr), (3, "before\n", "bad\n"), "CommandExitException")
    ok("a non-zero exit raises CommandExitException with exit_code 3 and stderr")

    t = time.monotonic()
    raises(TimeoutException, lambda: sbx.commands.run("sleep 60", timeout=3), "a command over its timeout")
    check(time.monotonic() - t < 30, "the command timeout cut it short", time.monotonic() - t)
    ok(f"commands.run(timeout=3) of sleep 60 raises TimeoutException after {time.monotonic() - t:.1f} s")

    h = sbx.commands.run("sleep 1; echo done-bg", background=True)
    check(h.pid > 0, "background pid", h.pid)
    r = h.wait()
    eq((r.stdout, r.exit_code), ("done-bg\n", 0), "background wait")
    ok(f"background command (pid {h.pid}) and handle.wait()")

    h = sbx.commands.run("sleep 600", background=True)
    procs = sbx.commands.list()
    mine = [p for p in procs if p.pid == h.pid]
    check(mine, f"commands.list shows pid {h.pid}", [p.pid for p in procs])
    eq(mine[0].cmd, "/bin/bash", "listed cmd")
    eq(mine[0].args, ["-l", "-c", "sleep 600"], "listed args")
    eq(h.kill(), True, "handle.kill()")
    e = raises(CommandExitException, h.wait, "wait on a killed command")
    check(e.exit_code != 0, "a killed command has a non-zero exit code", e.exit_code)
    wait_for(lambda: h.pid not in [p.pid for p in sbx.commands.list()], "killed pid gone from commands.list")
    eq(sbx.commands.kill(h.pid), False, "commands.kill of a pid that is gone")
    ok(f"commands.list shows a background command; kill ends it (exit code {e.exit_code})")

    h = sbx.commands.run("for i in $(seq 1 6); do echo tick$i; sleep 0.5; done", background=True)
    h.disconnect()
    c = sbx.commands.connect(h.pid)
    eq(c.pid, h.pid, "connect pid")
    r = c.wait()
    check("tick6\n" in r.stdout, "commands.connect streams the rest of the output", r.stdout)
    eq(r.exit_code, 0, "exit code through connect")
    ok("commands.connect to a running background command: its output and exit code")

    h = sbx.commands.run("cat; echo eof", background=True, stdin=True)
    h.send_stdin("line one\n")
    sbx.commands.send_stdin(h.pid, b"line two\n")
    h.close_stdin()
    r = h.wait()
    eq(r.stdout, "line one\nline two\neof\n", "stdin")
    ok("stdin=True: send_stdin (handle and commands), close_stdin gives EOF")


def pty_and_stream_input(sbx: Sandbox) -> None:
    # A terminal: an interactive login bash on a PTY, typed into, resized, exited.
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(h.pid, b"echo cols=$COLUMNS pty-$((6*7))\n")
    time.sleep(0.5)
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    time.sleep(0.3)
    sbx.pty.send_stdin(h.pid, b"echo cols=$COLUMNS\n")
    sbx.pty.stream_input(h.pid, [b"echo streamed-", b"$((2+3))\n", b"exit 0\n"])
    out = []
    r = h.wait(on_pty=lambda d: out.append(bytes(d)))
    text = b"".join(out).decode(errors="replace")
    eq(r.exit_code, 0, "pty exit code")
    for want in ("cols=80 pty-42", "cols=100", "streamed-5"):
        check(want in text, f"pty output has {want!r}", text[-400:])
    # stream_input into a command's stdin, then close it.
    c = sbx.commands.run("wc -c", background=True, stdin=True)
    sbx.commands.stream_input(c.pid, ["abc", b"def", "\n"])
    sbx.commands.close_stdin(c.pid)
    eq(c.wait().stdout.strip(), "7", "stream_input reached the command's stdin")
    ok("pty: create, send_stdin, resize, stream_input, exit; commands.stream_input")


def files(sbx: Sandbox) -> None:
    f = sbx.files
    w = f.write("notes/hello.txt", "hello world\n")
    eq(w.path, "/home/user/notes/hello.txt", "a relative path resolves against the default user's home")
    eq(w.type, FileType.FILE, "write info type")
    eq(f.read("/home/user/notes/hello.txt"), "hello world\n", "read as text")
    ok("write text (relative path, parents created) and read it back")

    blob = bytes(range(256)) * 16
    f.write("/tmp/bin.dat", blob)
    got = f.read("/tmp/bin.dat", format="bytes")
    eq(bytes(got), blob, "read as bytes")
    ok("write bytes and read them back as bytes")

    info = f.get_info("/home/user/notes/hello.txt")
    eq((info.name, info.type, info.size, info.path), ("hello.txt", FileType.FILE, 12,
                                                         "/home/user/notes/hello.txt"), "get_info")
    eq(info.owner, "user", "owner of a file the default user wrote")
    check(abs((info.modified_time - datetime.now(timezone.utc)).total_seconds()) < 300,
          "modified_time is about now", info.modified_time)
    d = f.get_info("/home/user/notes")
    eq(d.type, FileType.DIR, "get_info of a directory")
    eq((f.exists("/home/user/notes/hello.txt"), f.exists("/home/user/nope")), (True, False), "exists")
    raises(FileNotFoundException, lambda: f.read("/home/user/nope"), "read of a missing file")
    raises(FileNotFoundException, lambda: f.get_info("/home/user/nope"), "get_info of a missing file")
    ok("get_info (name, type, size, owner, mtime), exists, FileNotFoundException")

    eq(f.make_dir("/home/user/d1/d2"), True, "make_dir")
    eq(f.make_dir("/home/user/d1/d2"), False, "make_dir of an existing directory")
    f.write("/home/user/d1/a.txt", "a")
    f.write("/home/user/d1/d2/b.txt", "b")
    one = sorted((e.name, e.type) for e in f.list("/home/user/d1"))
    eq(one, [("a.txt", FileType.FILE), ("d2", FileType.DIR)], "list depth 1")
    two = sorted(e.path for e in f.list("/home/user/d1", depth=2))
    eq(two, ["/home/user/d1/a.txt", "/home/user/d1/d2", "/home/user/d1/d2/b.txt"], "list depth 2")
    ok("make_dir (True, then False), list with depth 1 and 2")

    r = f.rename("/home/user/d1/a.txt", "/home/user/d1/c.txt")
    eq(r.path, "/home/user/d1/c.txt", "rename result")
    eq((f.exists("/home/user/d1/a.txt"), f.read("/home/user/d1/c.txt")), (False, "a"), "after rename")
    f.remove("/home/user/d1")
    eq(f.exists("/home/user/d1"), False, "a removed directory (with contents)")
    ok("rename, remove (a directory with its contents)")

    f.make_dir("/home/user/watched")
    wh = f.watch_dir("/home/user/watched")
    f.write("/home/user/watched/new.txt", "x")
    seen = []

    def got_event():
        seen.extend(wh.get_new_events())
        return [e for e in seen if e.name == "new.txt"]

    evs = wait_for(got_event, "a watch_dir event for new.txt")
    wh.stop()
    ok(f"watch_dir: {sorted({e.type.value for e in evs})} event(s) for a file written after it started")

    big = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(big).hexdigest()
    f.write("/tmp/big.bin", big)
    eq(bytes(f.read("/tmp/big.bin", format="bytes")), big, "3 MiB read back")
    r = sbx.commands.run("sha256sum /tmp/big.bin")
    eq(r.stdout.split()[0], digest, "sha256 in the sandbox of the 3 MiB multipart upload")
    f.write("/tmp/big2.bin", big, use_octet_stream=True)
    r = sbx.commands.run("sha256sum /tmp/big2.bin; stat -c %s /tmp/big2.bin")
    eq(r.stdout.split()[0], digest, "sha256 in the sandbox of the 3 MiB octet-stream upload")
    ok("a 3 MiB binary file up (multipart and octet-stream) and down, byte for byte")

    # download_url / upload_url: the SDK makes them from E2B_SANDBOX_URL; through that one
    # listener they need the routing headers the SDK itself sends (E2b-Sandbox-Id/Port).
    route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    url = sbx.download_url("/tmp/bin.dat")
    check(url.startswith(os.environ["E2B_SANDBOX_URL"].rstrip("/") + "/files?"), "download_url", url)
    res = httpx.get(url, headers=route, timeout=RT)
    eq(res.status_code, 200, f"GET {url}")
    eq(res.content, blob, "download_url content")
    up = sbx.upload_url("/tmp/uploaded.txt")
    res = httpx.post(up, headers=route, files={"file": ("uploaded.txt", b"via upload_url\n")}, timeout=RT)
    check(res.status_code in (200, 201), f"POST {up}", (res.status_code, res.text))
    eq(f.read("/tmp/uploaded.txt"), "via upload_url\n", "upload_url content")
    ok("download_url and upload_url")

    w = f.write("rootfile.txt", "r\n", user="root")
    eq(w.path, "/root/rootfile.txt", 'a relative path as user="root" resolves against /root')
    eq(f.get_info("/root/rootfile.txt", user="root").owner, "root", "owner of root's file")
    eq(sbx.commands.run("cat rootfile.txt", user="root").stdout, "r\n", "root's command sees it in its cwd")
    e = raises(Exception, lambda: f.read("/root/rootfile.txt"), "the default user reading /root (0700)")
    ok(f'user="root" vs the default user: homes, owners, permissions ({type(e).__name__})')


def main() -> None:
    bad_input()

    t = time.monotonic()
    sbx = Sandbox.create(
        TEMPLATE,
        timeout=600,
        metadata={"suite": "hutch-e2b", "run": RUN},
        envs={"SBX_ENV": "sandbox-wide"},
        request_timeout=RT,
    )
    ok(f"Sandbox.create({TEMPLATE or ''}) -> {sbx.sandbox_id} in {time.monotonic() - t:.1f} s")
    sid = sbx.sandbox_id
    try:
        eq(sbx.is_running(), True, "is_running")
        info = sbx.get_info()
        eq(info.sandbox_id, sid, "get_info sandbox_id")
        eq(info.metadata, {"suite": "hutch-e2b", "run": RUN}, "get_info metadata")
        check(EXPECT_TEMPLATE in (info.template_id, info.name), f"get_info template id/name is {EXPECT_TEMPLATE}",
              (info.template_id, info.name))
        eq(info.state, SandboxState.RUNNING, "get_info state")
        now = datetime.now(timezone.utc)
        check(info.started_at <= now + timedelta(seconds=5), "started_at is not in the future", info.started_at)
        left = (info.end_at - now).total_seconds()
        check(450 < left <= 605, "end_at is about 600 s away (timeout=600)", left)
        ok(f"get_info: metadata, template {info.template_id!r}, state running, ends in {left:.0f} s")

        commands(sbx)
        pty_and_stream_input(sbx)
        files(sbx)

        found = Sandbox.list(query=SandboxQuery(metadata={"run": RUN}), request_timeout=RT).next_items()
        eq([s.sandbox_id for s in found], [sid], "Sandbox.list with a metadata filter")
        eq(found[0].metadata.get("suite"), "hutch-e2b", "listed metadata")
        eq(found[0].state, SandboxState.RUNNING, "listed state")
        none = Sandbox.list(query=SandboxQuery(metadata={"run": "not-" + RUN}), request_timeout=RT).next_items()
        eq(none, [], "Sandbox.list with a metadata value no sandbox has")
        ok("Sandbox.list(query=SandboxQuery(metadata=...)) finds exactly this sandbox")

        # A snapshot: a new sandbox from it has the file and the process of the source.
        sbx.files.write("/tmp/snap.txt", "from the snapshot\n")
        snap = sbx.create_snapshot()
        check(snap.snapshot_id and snap.snapshot_id in snap.names, "snapshot info", snap)
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=sid).next_items()]
        check(snap.snapshot_id in listed, "list_snapshots(sandbox_id) has it", listed)
        copy = Sandbox.create(snap.snapshot_id, timeout=120, request_timeout=RT)
        try:
            check(copy.sandbox_id != sid, "a new sandbox", copy.sandbox_id)
            eq(copy.files.read("/tmp/snap.txt"), "from the snapshot\n", "the snapshot's file")
            eq(copy.commands.run("hostname").stdout.strip() != sbx.commands.run("hostname").stdout.strip(),
               True, "the copy has a hostname of its own")
        finally:
            eq(copy.kill(), True, "kill the copy")
        eq(Sandbox.delete_snapshot(snap.snapshot_id), True, "delete_snapshot")
        eq(Sandbox.delete_snapshot(snap.snapshot_id), False, "delete_snapshot of a deleted one")
        ok(f"create_snapshot {snap.snapshot_id}, a sandbox from it, list_snapshots, delete_snapshot")

        sbx.set_timeout(1200)
        left = (sbx.get_info().end_at - datetime.now(timezone.utc)).total_seconds()
        check(1050 < left <= 1205, "set_timeout(1200) moved end_at", left)
        ok(f"set_timeout(1200): ends in {left:.0f} s")

        # pause, then connect resumes it: a file in /tmp and a process of its own survive. (hutch:
        # processes started through envd end with the pause, docs/e2b.md; one in a session of
        # its own lives on.)
        sbx.files.write("/tmp/keep.txt", "kept\n")
        sbx.commands.run("setsid sh -c 'echo $$ > /tmp/bg.pid; exec sleep 100000' </dev/null >/dev/null 2>&1 &")
        t = time.monotonic()
        eq(sbx.pause(), True, "pause")
        ok(f"pause in {time.monotonic() - t:.1f} s")
        eq(Sandbox.get_info(sid, request_timeout=RT).state, SandboxState.PAUSED, "state after pause")
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"run": RUN}, state=[SandboxState.PAUSED]), request_timeout=RT
        ).next_items()
        eq([s.sandbox_id for s in paused], [sid], "Sandbox.list state=[paused]")
        ok("get_info and Sandbox.list show it paused")
        t = time.monotonic()
        sbx = Sandbox.connect(sid, request_timeout=RT)
        ok(f"Sandbox.connect({sid}) resumed it in {time.monotonic() - t:.1f} s")
        eq(sbx.get_info().state, SandboxState.RUNNING, "state after connect")
        eq(sbx.files.read("/tmp/keep.txt"), "kept\n", "/tmp file after pause and resume")
        alive = sbx.commands.run("kill -0 $(cat /tmp/bg.pid) && echo alive").stdout
        eq(alive, "alive\n", "a process of its own after resume")
        eq(sbx.commands.run("echo back").stdout, "back\n", "a command after resume")
        ok("after resume: the /tmp file, the background process, commands")
    except BaseException:
        try:
            Sandbox.kill(sid, request_timeout=RT)
        except Exception:
            pass
        raise

    eq(sbx.kill(), True, "kill")
    ok("kill")
    eq(sbx.is_running(), False, "is_running after kill")
    raises(SandboxNotFoundException, lambda: Sandbox.get_info(sid, request_timeout=RT), "get_info after kill")
    raises(SandboxNotFoundException, lambda: Sandbox.connect(sid, request_timeout=RT), "connect after kill")
    eq(Sandbox.kill(sid, request_timeout=RT), False, "a second kill")
    gone = Sandbox.list(query=SandboxQuery(metadata={"run": RUN}), request_timeout=RT).next_items()
    eq(gone, [], "Sandbox.list after kill")
    ok("after kill: not running, get_info/connect raise SandboxNotFoundException, kill False, not listed")
    print(f"PASS session_sync: {_n} steps in {time.monotonic() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
    except Exception as e:
        traceback.print_exc()
        print(f"FAIL: unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
