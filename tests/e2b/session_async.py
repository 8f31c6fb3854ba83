#!/usr/bin/env python3
"""A scripted session with the official, unmodified E2B Python SDK (AsyncSandbox, e2b 2.63.0)
against hutchd's E2B-compatible server.

    E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT \\
    E2B_API_KEY=$(cat DATA_DIR/api-token) target/e2b-sdk/venv/bin/python tests/e2b/session_async.py

Same variables and output as session_sync.py. Covers the async API and what differs from the sync
one on the wire: concurrent commands on one sandbox, async output callbacks, watch_dir as a
server stream (the sync SDK polls a watcher instead), several files in one multipart upload, and
a streamed read. One sandbox; no pause (session_sync.py and session.mjs cover it).
"""

import asyncio
import hashlib
import os
import sys
import time
import traceback
import uuid

try:
    from e2b import (
        AsyncSandbox,
        AuthenticationException,
        CommandExitException,
        FileNotFoundException,
        FilesystemEventType,
        FileType,
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


async def raises(exc, aw, what: str):
    """Awaits aw (a coroutine); it must raise exc. Returns the exception."""
    try:
        r = await aw
    except exc as e:
        return e
    except Exception as e:
        raise Failed(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}")
    raise Failed(f"{what}: expected {exc.__name__}, got no exception but {r!r}")


async def wait_for(fn, what: str, timeout: float = 20.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not seen within {timeout:.0f} s")
        await asyncio.sleep(every)


async def bad_input() -> None:
    await raises(
        AuthenticationException,
        AsyncSandbox.create(TEMPLATE, api_key="e2b_" + "1" * 40, request_timeout=RT),
        "create with a wrong API key",
    )
    ok("a wrong API key raises AuthenticationException")
    missing = "i" + uuid.uuid4().hex[:19]
    await raises(SandboxNotFoundException, AsyncSandbox.connect(missing, request_timeout=RT), "connect unknown id")
    await raises(SandboxNotFoundException, AsyncSandbox.get_info(missing, request_timeout=RT), "get_info unknown id")
    eq(await AsyncSandbox.kill(missing, request_timeout=RT), False, "kill of an unknown id")
    ok("an unknown sandbox id: connect/get_info raise SandboxNotFoundException, kill returns False")


async def commands(sbx: AsyncSandbox) -> None:
    c = sbx.commands
    r = await c.run("echo hello; echo oops >&2; id -un")
    eq((r.stdout, r.stderr, r.exit_code), ("hello\nuser\n", "oops\n", 0), "foreground run")
    r = await c.run("id -un; pwd", user="root")
    eq(r.stdout, "root\n/root\n", 'user="root"')
    ok("commands.run: stdout, stderr; default user vs root")

    t = time.monotonic()
    rs = await asyncio.gather(*(c.run(f"sleep 2; echo n{i}") for i in range(5)))
    took = time.monotonic() - t
    eq([x.stdout for x in rs], [f"n{i}\n" for i in range(5)], "five concurrent commands")
    check(took < 8, "five `sleep 2` commands ran side by side", f"{took:.1f} s")
    ok(f"five concurrent commands on one sandbox in {took:.1f} s")

    outs, errs = [], []

    async def on_out(s):
        await asyncio.sleep(0)
        outs.append(s)

    r = await c.run(
        'for i in 1 2 3; do echo "o$i $SBX_ENV $CMD_ENV"; echo e$i >&2; sleep 0.3; done',
        envs={"CMD_ENV": "cmd"},
        cwd="/tmp",
        on_stdout=on_out,
        on_stderr=errs.append,
    )
    eq("".join(outs), "o1 sbx cmd\no2 sbx cmd\no3 sbx cmd\n", "async on_stdout with envs")
    eq("".join(errs), "e1\ne2\ne3\n", "sync on_stderr")
    ok("async on_stdout / on_stderr callbacks; sandbox and command envs")

    e = await raises(CommandExitException, c.run("echo x >&2; exit 7"), "exit 7")
    eq((e.exit_code, e.stderr), (7, "x\n"), "CommandExitException")
    # On Python 3.11 the async SDK does not enforce `timeout` itself once the stream is open (its
    # deadline is armed in the task asyncio.wait_for made for the first event): this passes only
    # when the server ends the stream at the request's Connect-Timeout-Ms (deadline_exceeded).
    await raises(TimeoutException, c.run("sleep 60", timeout=2), "command timeout")
    ok("CommandExitException (7) and TimeoutException")

    h = await c.run("sleep 600", background=True)
    check(h.pid in [p.pid for p in await c.list()], "commands.list shows the background pid", h.pid)
    eq(await h.kill(), True, "kill")
    e = await raises(CommandExitException, h.wait(), "wait on a killed command")
    check(e.exit_code != 0, "killed: non-zero exit code", e.exit_code)
    ok("background command, list, kill, wait")

    h = await c.run("for i in 1 2 3 4; do echo t$i; sleep 0.5; done", background=True)
    await h.disconnect()
    got = []
    h2 = await c.connect(h.pid, on_stdout=got.append)
    r = await h2.wait()
    check("t4\n" in "".join(got) and "t4\n" in r.stdout, "connect: the rest of the output", r.stdout)
    ok("commands.connect with on_stdout")

    h = await c.run("tr a-z A-Z", background=True, stdin=True)
    await h.send_stdin("abc\n")
    await c.send_stdin(h.pid, b"def\n")
    await h.close_stdin()
    r = await h.wait()
    eq(r.stdout, "ABC\nDEF\n", "stdin through tr")
    ok("stdin=True: send_stdin, close_stdin")


async def files(sbx: AsyncSandbox) -> None:
    f = sbx.files
    w = await f.write("a/one.txt", "one\n")
    eq(w.path, "/home/user/a/one.txt", "relative path against /home/user")
    eq(await f.read("a/one.txt"), "one\n", "read text (relative)")
    data = bytes(range(256)) * 64
    await f.write("/tmp/b.bin", data)
    eq(bytes(await f.read("/tmp/b.bin", format="bytes")), data, "read bytes")
    ok("write/read text and bytes")

    ws = await f.write_files(
        [
            {"path": "/home/user/m/x.txt", "data": "x"},
            {"path": "/home/user/m/y.bin", "data": b"\x00\x01y"},
            {"path": "m/z.txt", "data": "z"},
        ]
    )
    eq(sorted(i.path for i in ws), ["/home/user/m/x.txt", "/home/user/m/y.bin", "/home/user/m/z.txt"],
       "write_files paths")
    eq(sorted((e.name, e.size) for e in await f.list("/home/user/m")), [("x.txt", 1), ("y.bin", 3), ("z.txt", 1)],
       "list after write_files")
    ok("write_files: three files in one multipart upload")

    info = await f.get_info("/home/user/m/x.txt")
    eq((info.type, info.size, info.owner), (FileType.FILE, 1, "user"), "get_info")
    eq(await f.make_dir("/home/user/m/sub"), True, "make_dir")
    eq(await f.make_dir("/home/user/m/sub"), False, "make_dir again")
    r = await f.rename("/home/user/m/x.txt", "/home/user/m/sub/x2.txt")
    eq(r.path, "/home/user/m/sub/x2.txt", "rename")
    paths = sorted(e.path for e in await f.list("/home/user/m", depth=2))
    eq(paths, ["/home/user/m/sub", "/home/user/m/sub/x2.txt", "/home/user/m/y.bin", "/home/user/m/z.txt"],
       "list depth 2")
    await f.remove("/home/user/m/z.txt")
    eq(await f.exists("/home/user/m/z.txt"), False, "exists after remove")
    await raises(FileNotFoundException, f.read("/home/user/m/z.txt"), "read a removed file")
    ok("get_info, make_dir, rename, list depth 2, remove, exists, FileNotFoundException")

    await f.make_dir("/home/user/w")
    events = []
    ended = []
    wh = await f.watch_dir("/home/user/w", on_event=events.append, on_exit=ended.append, timeout=60)
    await f.write("/home/user/w/new.txt", "hi")
    evs = await wait_for(lambda: [e for e in events if e.name == "new.txt"], "a streamed watch event for new.txt")
    check(any(e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in evs),
          "a create or write event", evs)
    await wh.stop()
    ok(f"watch_dir (server stream): {sorted({e.type.value for e in evs})} for new.txt")

    big = os.urandom(2 * 1024 * 1024 + 3)
    await f.write("/tmp/big.bin", big)
    reader = await f.read("/tmp/big.bin", format="stream")
    h = hashlib.sha256()
    n = 0
    async for chunk in reader:
        h.update(chunk)
        n += len(chunk)
    eq((n, h.hexdigest()), (len(big), hashlib.sha256(big).hexdigest()), "streamed read of 2 MiB")
    ok("a 2 MiB file read back as a stream")


async def main() -> None:
    await bad_input()
    t = time.monotonic()
    sbx = await AsyncSandbox.create(
        TEMPLATE,
        timeout=300,
        metadata={"suite": "hutch-e2b-async", "run": RUN},
        envs={"SBX_ENV": "sbx"},
        request_timeout=RT,
    )
    sid = sbx.sandbox_id
    ok(f"AsyncSandbox.create -> {sid} in {time.monotonic() - t:.1f} s")
    try:
        info = await sbx.get_info()
        eq((info.metadata, info.state), ({"suite": "hutch-e2b-async", "run": RUN}, SandboxState.RUNNING), "get_info")
        check(EXPECT_TEMPLATE in (info.template_id, info.name), "template", (info.template_id, info.name))
        ok("get_info: metadata, state, template")
        await commands(sbx)
        await files(sbx)
        found = await AsyncSandbox.list(query=SandboxQuery(metadata={"run": RUN}), request_timeout=RT).next_items()
        eq([s.sandbox_id for s in found], [sid], "AsyncSandbox.list by metadata")
        await sbx.set_timeout(600)
        ok("AsyncSandbox.list by metadata; set_timeout")
    except BaseException:
        try:
            await AsyncSandbox.kill(sid, request_timeout=RT)
        except Exception:
            pass
        raise
    eq(await sbx.kill(), True, "kill")
    await raises(SandboxNotFoundException, AsyncSandbox.get_info(sid, request_timeout=RT), "get_info after kill")
    await raises(SandboxNotFoundException, AsyncSandbox.connect(sid, request_timeout=RT), "connect after kill")
    ok("kill; afterwards get_info and connect raise SandboxNotFoundException")
    print(f"PASS session_async: {_n} steps in {time.monotonic() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
        # Seen once in CI: the session passed, then the interpreter aborted (SIGABRT) while
        # tearing down the SDK's native HTTP client (pyqwest) at exit. The result is in; leave
        # without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except Failed as e:
        print(f"FAIL: {e}", flush=True)
        sys.exit(1)
    except Exception as e:
        traceback.print_exc()
        print(f"FAIL: unexpected {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
