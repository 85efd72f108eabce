#!/usr/bin/env python3
"""SCIM throughput of `serve` on SQLite (one process) and on PostgreSQL with one and two
replicas, measured in one run on the same machine: filter lookups of names that exist nowhere
(what every IdP sends before a create: no cache can answer), repeated lookups of existing names
with the lookup cache on and off, POST /Users, and membership PATCHes of one 5,000-member group
from 32 concurrent writers. wrk with 32 connections in all, split evenly over the replicas
(one wrk per replica, run at the same time), 10 s per measurement after 1 s of the same load
unmeasured; the load generator shares the machine's cores with the servers and the database.

    python3 crates/bench/scripts/replicas.py [--bin target/release/teamcity-scim]
        [--pg postgres://postgres@127.0.0.1:5432] [--seconds 10] [--users 10000]

Needs wrk and a PostgreSQL server (it creates and drops its own database). No TeamCity token
is configured, so the servers store and queue (the sync engine is not part of this benchmark).
"""

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def psql(pg, sql):
    subprocess.run(["psql", f"{pg}/postgres", "-qtAc", sql], check=True, capture_output=True)


class Replica:
    def __init__(self, binary, db_url, env_extra, work):
        self.port = free_port()
        self.out = open(os.path.join(work, f"out-{self.port}"), "w+")
        env = dict(os.environ)
        env.update({
            "TEAMCITY_SCIM_DATABASE__URL": db_url,
            "TEAMCITY_SCIM_SERVER__LISTEN": f"127.0.0.1:{self.port}",
            "TEAMCITY_SCIM_ADMIN__LISTEN": "",
            "TEAMCITY_SCIM_SERVER__RATE_LIMIT_PER_SECOND": "0",
            "RUST_LOG": "warn",
        })
        env.update(env_extra)
        self.proc = subprocess.Popen([binary, "serve"], stdout=self.out,
                                     stderr=subprocess.DEVNULL, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(self.base + "/healthz/live", timeout=1)
                return
            except Exception:
                time.sleep(0.05)
        raise SystemExit(f"serve on {db_url} did not come up")

    def token(self):
        self.out.flush()
        self.out.seek(0)
        m = re.search(r"tcscim_[A-Za-z0-9_-]+", self.out.read())
        return m.group(0) if m else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def call(base, token, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + "/scim/v2" + path, data, method=method, headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/scim+json"})
    with urllib.request.urlopen(req) as r:
        text = r.read()
        return json.loads(text) if text else None


LUA = {
    "lookup-miss": """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/scim/v2/Users?filter=userName%20eq%20%22nobody-" .. tag .. "-" .. n .. "%40example.com%22", {["Authorization"] = auth})
end
""",
    "lookup-hit": """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/scim/v2/Users?filter=userName%20eq%20%22seed" .. (n % 500) .. "%40example.com%22", {["Authorization"] = auth})
end
""",
    "post": """
local n = 0
request = function()
  n = n + 1
  local body = '{"schemas":["urn:ietf:params:scim:schemas:core:2.0:User"],"userName":"post-' .. tag .. '-' .. n .. '@example.com","active":true}'
  return wrk.format("POST", "/scim/v2/Users", {["Authorization"] = auth, ["Content-Type"] = "application/scim+json"}, body)
end
""",
    "member-add": """
local n = 0
request = function()
  n = n + 1
  -- 7919 is prime to the pool's size: every wrk (one per replica, each with this same
  -- sequence) names each pool member once in every #ids requests.
  local id = ids[(n * 7919) % #ids + 1]
  local body = '{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"' .. id .. '"}]}]}'
  return wrk.format("PATCH", path, {["Authorization"] = auth, ["Content-Type"] = "application/scim+json"}, body)
end
""",
}


def wrk_all(replicas, script, seconds, conns, work):
    """Runs one wrk per replica at once; returns (req/s summed, worst p50 ms, worst p99 ms, non-2xx)."""
    per = max(1, conns // len(replicas))
    procs = []
    for r in replicas:
        path = os.path.join(work, f"{r.port}.lua")
        with open(path, "w") as f:
            # A tag of its own per wrk (wrk's Lua random is not seeded: two runs would send
            # the same names and collide).
            f.write(f'local tag = "{r.port}-{uuid.uuid4().hex[:8]}"\n' + script)
        procs.append(subprocess.Popen(
            ["wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--latency", "-s", path, r.base],
            stdout=subprocess.PIPE, text=True))
    rps, p50, p99, bad = 0.0, 0.0, 0.0, 0
    for p in procs:
        out = p.communicate()[0]
        rps += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
        p50 = max(p50, ms(lat["50"]))
        p99 = max(p99, ms(lat["99"]))
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        bad += int(m.group(1)) if m else 0
    return rps, p50, p99, bad


def ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def measure(name, binary, db_url, n_replicas, args, work, env):
    rows = []
    first = Replica(binary, db_url, env, work)
    token = None
    for _ in range(100):
        token = first.token()
        if token:
            break
        time.sleep(0.1)
    if not token:
        raise SystemExit("no initial token printed")
    replicas = [first] + [Replica(binary, db_url, env, work) for _ in range(n_replicas - 1)]
    try:
        # Seed: users (spread over the replicas), a 5,000-member group, a pool to add.
        started = time.monotonic()

        def seed(i):
            r = replicas[i % len(replicas)]
            return call(r.base, token, "POST", "/Users", {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": f"seed{i}@example.com", "active": True})["id"]
        with cf.ThreadPoolExecutor(16) as ex:
            ids = list(ex.map(seed, range(args.users)))
        seeded = args.users / (time.monotonic() - started)
        group = call(first.base, token, "POST", "/Groups", {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Burst",
            "members": [{"value": i} for i in ids[:5000]]})["id"]
        pool = ids[5000:]
        if db_url.startswith("postgres") and args.analyze:
            # What autovacuum would have done by now on a database in service: the planner's
            # statistics of the seeded tables.
            subprocess.run(["psql", db_url.split("?")[0], "-qtAc", "ANALYZE"], check=True, capture_output=True)
        auth = f'local auth = "Bearer {token}"\n'
        member_prefix = auth + ("local ids = {" + ",".join(f'"{i}"' for i in pool) + "}\n"
                                f'local path = "/scim/v2/Groups/{group}"\n')
        for what in ["lookup-miss", "lookup-hit", "post", "member-add"]:
            script = (member_prefix if what == "member-add" else auth) + LUA[what]
            if args.warmup > 0:
                # Unmeasured, as scim-bench's warm-up: a fresh replica's first second opens
                # its pool's connections and fills PostgreSQL's backend caches.
                wrk_all(replicas, script, args.warmup, 32, work)
            rps, p50, p99, bad = wrk_all(replicas, script, args.seconds, 32, work)
            rows.append((name, what, rps, p50, p99, bad))
            print(f"{name:<22} {what:<12} {rps:>9.0f} req/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  non-2xx {bad}",
                  file=sys.stderr)
        # No member lost: every wrk named every pool member (duplicates allowed) when it sent at
        # least as many requests as the pool has, and every answer was a 2xx; then the group
        # must have them all.
        members = call(first.base, token, "GET", f"/Groups/{group}")["members"]
        _, _, add_rps, _, _, add_bad = rows[-1]
        per_wrk = add_rps * args.seconds / len(replicas)
        if add_bad == 0 and per_wrk >= len(pool) and len(members) != 5000 + len(pool):
            raise SystemExit(f"{name}: {5000 + len(pool) - len(members)} members lost in the burst "
                             f"({len(members)} in the group, {5000 + len(pool)} expected)")
        rows.append((name, "seeding POST (16 threads)", seeded, 0, 0, 0))
        rows.append((name, "members after", len(members), 0, 0, 0))
    finally:
        for r in replicas:
            r.stop()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/teamcity-scim")
    ap.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    ap.add_argument("--pg-params", default="",
                    help="query parameters for each PostgreSQL database URL, e.g. max_connections=32")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1,
                    help="seconds of the same load, unmeasured, before each measurement")
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--analyze", action=argparse.BooleanOptionalAction, default=True,
                    help="ANALYZE a PostgreSQL database after seeding (as autovacuum would have)")
    ap.add_argument("--only", default="sqlite,sqlite-nocache,pg1,pg1-nocache,pg2")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install wrk)")
    work = tempfile.mkdtemp()
    rows = []
    try:
        for config in args.only.split(","):
            base, _, flag = config.partition("-")
            env = {"TEAMCITY_SCIM_SERVER__LOOKUP_CACHE_MB": "0"} if flag == "nocache" else {}
            cache = ", cache off" if flag == "nocache" else ""
            if base == "sqlite":
                path = f"{work}/{uuid.uuid4().hex[:8]}.db"
                rows += measure(f"SQLite, 1 process{cache}", args.bin, f"sqlite://{path}", 1, args, work, env)
            else:
                n = int(base[2:])
                db = "bench_" + uuid.uuid4().hex[:8]
                psql(args.pg, f"CREATE DATABASE {db}")
                try:
                    url = f"{args.pg}/{db}" + (f"?{args.pg_params}" if args.pg_params else "")
                    rows += measure(f"PostgreSQL, {n} replica(s){cache}", args.bin, url, n, args, work, env)
                finally:
                    psql(args.pg, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| backend | measurement | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---|---|---|---|---|")
    for name, what, rps, p50, p99, bad in rows:
        if what == "members after":
            print(f"| {name} | group members after the burst | {rps} | | | |")
        elif what.startswith("seeding"):
            print(f"| {name} | {what} | {rps:.0f} | | | |")
        else:
            print(f"| {name} | {what} | {rps:.0f} | {p50:.1f} | {p99:.1f} | {bad} |")


if __name__ == "__main__":
    main()
