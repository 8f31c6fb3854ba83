#!/usr/bin/env python3
"""Measures QEMU snapshot/restore cost against guest RAM size, for issue 10's choice (see
docs/snapshots.md). Not part of the product or the test suite: a measurement to re-run.

    scripts/spike-snapshot.py KERNEL [MIB ...]      (default sizes: 256 1024)

For each size it boots KERNEL with a tiny busybox initramfs whose /init fills half of RAM with
random data (so the pages are really in use), then compares two ways:

  anon   guest RAM anonymous; `migrate file:state` writes all of RAM; restore reads it back
  shared guest RAM a file in /dev/shm (memory-backend-file, share=on) and `x-ignore-shared`:
         the state file holds only device state; a restore maps a copy-on-write view of the
         memory file (share=off), so nothing is copied up front

and prints save time, state size and restore time (process start to `running`).
Needs root (for /dev/shm files it can drop), busybox-static, cpio, qemu-system-x86_64 >= 8.2.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(400):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.01)
    f = s.makefile("rw")
    json.loads(f.readline())

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r

    cmd("qmp_capabilities")
    return cmd


def initramfs(dir_):
    root = os.path.join(dir_, "root")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy("/bin/busybox", os.path.join(root, "bin/busybox"))
    with open(os.path.join(root, "init"), "w") as f:
        f.write("#!/bin/busybox sh\n/bin/busybox mkdir -p /proc /tmp /dev\n"
                "/bin/busybox mount -t devtmpfs dev /dev\n"
                "/bin/busybox mount -t proc proc /proc\n"
                "/bin/busybox mount -t tmpfs -o size=90% tmpfs /tmp\n"
                "half=$(( $(/bin/busybox awk '/MemTotal/ {print $2}' /proc/meminfo) / 2048 ))\n"
                "/bin/busybox dd if=/dev/urandom of=/tmp/fill bs=1M count=$half 2>/dev/null\n"
                "echo READY > /dev/ttyS0\n"
                "while true; do /bin/busybox sleep 1000; done\n")
    os.chmod(os.path.join(root, "init"), 0o755)
    out = os.path.join(dir_, "init.cpio")
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                       stdout=f, check=True)
    return out


def qemu(dir_, kernel, initrd, mib, mem, incoming=None):
    sock = os.path.join(dir_, f"qmp-{time.time_ns()}.sock")
    serial = os.path.join(dir_, "serial.log")
    args = ["qemu-system-x86_64", "-M", "pc", "-cpu", "qemu64", "-accel", "tcg", "-m", str(mib),
            "-nodefaults", "-display", "none", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet rdinit=/init", "-serial", f"file:{serial}",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    if mem:
        args += ["-object", mem, "-machine", "memory-backend=mem"]
    if incoming:
        args += ["-incoming", "defer"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, qmp(sock), serial


def wait_status(cmd, want, limit=120):
    t = time.time()
    while time.time() - t < limit:
        st = cmd("query-status")["return"]["status"]
        if st == want:
            return
        time.sleep(0.005)
    raise SystemExit(f"status never became {want}")


def run(kernel, initrd, dir_, mib, mode):
    shm = f"/dev/shm/hutch-spike-{os.getpid()}-{mib}"
    state = os.path.join(dir_, f"state-{mode}-{mib}")
    mem = (f"memory-backend-file,id=mem,size={mib}M,mem-path={shm},share=on"
           if mode == "shared" else None)
    p, cmd, serial = qemu(dir_, kernel, initrd, mib, mem)
    t = time.time()
    while "READY" not in open(serial, errors="replace").read():
        if time.time() - t > 240 or p.poll() is not None:
            p.kill()
            raise SystemExit("guest did not fill its memory")
        time.sleep(0.1)
    if mode == "shared":
        cmd("migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}])
    t0 = time.time()
    cmd("stop")
    cmd("migrate", uri=f"file:{state}")
    while cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
        time.sleep(0.005)
    save = time.time() - t0
    size = os.path.getsize(state)
    cmd("quit")
    p.wait()
    # Restore: a new process; shared mode maps the memory file copy-on-write (share=off).
    mem = (f"memory-backend-file,id=mem,size={mib}M,mem-path={shm},share=off"
           if mode == "shared" else None)
    t0 = time.time()
    p, cmd, _ = qemu(dir_, kernel, initrd, mib, mem, incoming=True)
    if mode == "shared":
        cmd("migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}])
    cmd("migrate-incoming", uri=f"file:{state}")
    wait_status(cmd, "paused")
    cmd("cont")
    wait_status(cmd, "running")
    restore = time.time() - t0
    cmd("quit")
    p.wait()
    for f in (state, shm):
        if os.path.exists(f):
            os.remove(f)
    print(f"{mode:6} {mib:5} MiB: save {save*1000:7.0f} ms, state {size/1048576:7.1f} MiB, "
          f"restore {restore*1000:6.0f} ms", flush=True)


def main():
    kernel = sys.argv[1]
    sizes = [int(a) for a in sys.argv[2:]] or [256, 1024]
    with tempfile.TemporaryDirectory(prefix="hutch-spike") as d:
        initrd = initramfs(d)
        for mib in sizes:
            for mode in ("anon", "shared"):
                run(kernel, initrd, d, mib, mode)


if __name__ == "__main__":
    main()
