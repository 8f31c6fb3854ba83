#!/usr/bin/env python3
"""Sandbox start-to-first-command latency through the official E2B Python SDK (e2b 2.63.0):
N times Sandbox.create(TEMPLATE) + commands.run("true") + kill(), one after another, then the
p50/p90/p99 wall time of each phase and of the whole cycle. Meant for comparing a template with a
warm pool against a cold one on the same hutchd.

    E2B_API_URL=http://127.0.0.1:PORT E2B_SANDBOX_URL=http://127.0.0.1:PORT \\
    E2B_API_KEY=$(cat DATA_DIR/api-token) target/e2b-sdk/venv/bin/python tests/e2b/bench.py TEMPLATE [-n 20]

Exits non-zero if any cycle fails (after killing what it made).
"""

import argparse
import json
import math
import os
import sys
import time

from e2b import Sandbox


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("template", help="template (or image) name to create sandboxes from")
    ap.add_argument("-n", type=int, default=20, help="cycles (default 20)")
    ap.add_argument("--json", action="store_true",
                    help="also print the percentiles (ms) as one JSON line, last")
    ap.add_argument("--request-timeout", type=float,
                    default=float(os.environ.get("E2B_TEST_REQUEST_TIMEOUT") or "120"))
    a = ap.parse_args()
    for var in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"):
        if not os.environ.get(var):
            print(f"bench: {var} is not set", file=sys.stderr)
            return 2

    phases = {"create": [], "run true": [], "kill": [], "total": []}
    for i in range(a.n):
        t0 = time.perf_counter()
        sbx = Sandbox.create(a.template, timeout=300, metadata={"bench": "1"}, request_timeout=a.request_timeout)
        t1 = time.perf_counter()
        try:
            r = sbx.commands.run("true")
            if r.exit_code != 0:
                raise RuntimeError(f"`true` exited {r.exit_code}")
            t2 = time.perf_counter()
        except BaseException:
            sbx.kill()
            raise
        if not sbx.kill():
            raise RuntimeError(f"kill of {sbx.sandbox_id} found no sandbox")
        t3 = time.perf_counter()
        phases["create"].append(t1 - t0)
        phases["run true"].append(t2 - t1)
        phases["kill"].append(t3 - t2)
        phases["total"].append(t3 - t0)
        print(f"  {i + 1:3}/{a.n}  create {t1 - t0:7.3f} s  run {t2 - t1:7.3f} s  kill {t3 - t2:7.3f} s",
              flush=True)

    print(f"template {a.template!r}, {a.n} cycles (seconds):")
    print(f"  {'phase':<9} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for name, xs in phases.items():
        print(f"  {name:<9} {pct(xs, 50):8.3f} {pct(xs, 90):8.3f} {pct(xs, 99):8.3f} {max(xs):8.3f}")
    if a.json:
        print(json.dumps({name: {"p50": pct(xs, 50) * 1000, "p90": pct(xs, 90) * 1000,
                                 "p99": pct(xs, 99) * 1000, "max": max(xs) * 1000}
                          for name, xs in phases.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
