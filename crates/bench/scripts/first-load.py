#!/usr/bin/env python3
"""A first load over SCIM, end to end on the real binaries: `teamcity-scim emulator` (TeamCity
with a fixed latency per call) and `teamcity-scim serve` on a fresh SQLite file pointed at it.
N users are pushed with POST /Users from several keep-alive connections (Entra/Okta-style
bodies), then N/10 groups with POST /Groups carrying their members inline (5 groups per user on
average). Measured: the push rate; the time from the first and from the last push until TeamCity
has converged (the outbox has nothing pending and the emulator holds the users and groups); the
TeamCity calls (reads and writes, from the emulator's counters) per user and per group against
the ideal calls x latency / concurrency; and the RSS of `serve` (VmRSS sampled every 0.5 s
during the load, VmHWM, and VmRSS after 30 s idle).

    python3 crates/bench/scripts/first-load.py [--bin target/release/teamcity-scim]
        [--users 100000] [--groups N/10] [--latency-ms 5] [--concurrency 8]
        [--connections 16] [--policy-match displayName|externalId] [--idle-seconds 30]
        [--keep] [--rss-trace FILE]
        [--env KEY=VALUE ...] [--pg postgres://postgres@127.0.0.1:5432 [--replicas 2]]

--pg runs `serve` on a new PostgreSQL database on that server (created and dropped by the
script) instead of SQLite, with --replicas processes on it: the pushes are spread over them
(connection i goes to replica i mod N), one of them applies to TeamCity at a time (the `sync`
lease), and RSS is reported for the largest.

--keep keeps the work directory (database, config, serve's stdout/stderr); --rss-trace writes
the RSS samples; --env sets variables for serve (e.g. RUST_LOG=info,sync=debug, allocator
settings).

Targets (printed next to the figures; a missed target does not fail the run): RSS idle with
100,000 users <= 64 MB, under the load <= 200 MB; calls <= 1.05 per user plus one per group;
converged within 1.2 x calls x latency / concurrency. Exits non-zero only on errors (a push
refused, no convergence within --timeout, counts that do not match).
"""

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret",
         "Dennis", "Radia", "Leslie", "Niklaus", "Sophie", "John", "Katherine", "Tim", "Hedy"]
LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
        "Hamilton", "Ritchie", "Perlman", "Lamport", "Wirth", "Wilson", "Backus", "Johnson"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(port, path, what, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what} did not come up on port {port}")


class Emulator:
    def __init__(self, port, token):
        self.port, self.token = port, token
        self.probes = {}  # "GET <route>": probe requests sent
        self.lock = threading.Lock()

    def get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        c.request("GET", path, headers={"Authorization": "Bearer " + self.token,
                                        "Accept": "application/json"})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status != 200:
            raise SystemExit(f"emulator GET {path}: {r.status} {body[:200]!r}")
        return json.loads(body)

    def counters(self):
        return self.get("/__emulator/counters")

    def probe(self, path, route, accept="application/json"):
        """(status, body) of GET /app/rest{path}; counted under `route` so that the load's
        call figures can leave the probes out."""
        with self.lock:
            self.probes[route] = self.probes.get(route, 0) + 1
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", "/app/rest" + path, headers={"Authorization": "Bearer " + self.token,
                                                     "Accept": accept})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, body

    def reset_counters(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("DELETE", "/__emulator/counters")
        c.getresponse().read()
        c.close()


def split_counters(counters):
    """(reads, writes, {route: calls}) from the emulator's `"<METHOD> <route>": n` map."""
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(k if not prefix else f"{prefix} {k}", x)
        elif isinstance(v, (int, float)):
            flat[prefix] = int(v)
    walk("", counters)
    reads = sum(n for k, n in flat.items() if k.startswith(("GET ", "HEAD ")))
    writes = sum(n for k, n in flat.items() if not k.startswith(("GET ", "HEAD ")))
    return reads, writes, flat


def rss_kb(pid):
    """(VmRSS, VmHWM) in kB, or (None, None) once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None, None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return (int(rss.group(1)) if rss else None, int(hwm.group(1)) if hwm else None)


class RssSampler(threading.Thread):
    def __init__(self, pid, every=0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = []  # (monotonic, rss kB)
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            rss, _ = rss_kb(self.pid)
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self.stop_flag.wait(self.every)

    def peak_between(self, t0, t1):
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None


class PgOutbox:
    """The outbox read with psql from the PostgreSQL database."""

    def __init__(self, url):
        self.url = url

    def counts(self):
        out = subprocess.run(["psql", self.url, "-qtAF", "|", "-c",
                              "SELECT state, count(*) FROM outbox GROUP BY state"],
                             check=True, capture_output=True, text=True).stdout
        return {k: int(v) for k, v in (line.split("|") for line in out.split() if "|" in line)}


class Outbox:
    """The outbox read straight from the SQLite file, read-only."""

    def __init__(self, path):
        self.path = path
        self.db = None

    def counts(self):
        if self.db is None:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                      check_same_thread=False)
        rows = self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return dict(rows)


def user_body(i, rng):
    first, last = rng.choice(FIRST), rng.choice(LAST)
    login = f"{first.lower()}.{last.lower()}.{i:06d}@contoso.example"
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "externalId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "userName": login,
        "active": True,
        "displayName": f"{first} {last}",
        "name": {"formatted": f"{first} {last}", "familyName": last, "givenName": first},
        "emails": [{"primary": True, "type": "work", "value": login}],
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
            "department": rng.choice(["Engineering", "QA", "Ops", "Sales"]),
        },
    }


def group_external_id(g):
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"tc-group-{g:05d}.contoso.example"))


def group_body(g, member_ids, rng):
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "externalId": group_external_id(g),
        "displayName": f"tc-group-{g:05d}",
        "members": [{"value": m} for m in member_ids],
    }


class Pusher:
    """Sends POSTs from `connections` threads, each with its own keep-alive connection."""

    def __init__(self, ports, token, connections):
        self.ports, self.token, self.connections = ports, token, connections
        self.errors = []
        self.retries = 0

    def run(self, path, bodies, hooks=None):
        """POSTs every body; returns the created ids in order (None where it failed). `hooks`
        maps an index to a function started in a thread of its own when that body is taken."""
        ids = [None] * len(bodies)
        next_i = [0]
        lock = threading.Lock()
        hooks = dict(hooks or {})
        started = []

        def worker(port):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            headers = {"Authorization": "Bearer " + self.token,
                       "Content-Type": "application/scim+json",
                       "Accept": "application/scim+json"}
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                    hook = hooks.pop(i, None)
                if hook is not None:
                    t = threading.Thread(target=hook, daemon=True)
                    t.start()
                    started.append(t)
                if i >= len(bodies) or len(self.errors) > 20:
                    break
                data = json.dumps(bodies[i]).encode()
                for attempt in range(5):
                    try:
                        conn.request("POST", "/scim/v2" + path, data, headers)
                        r = conn.getresponse()
                        text = r.read()
                    except (OSError, http.client.HTTPException) as e:
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                        if attempt == 4:
                            self.errors.append(f"POST {path} #{i}: {e}")
                        else:
                            with lock:
                                self.retries += 1
                        continue
                    if r.status == 201:
                        ids[i] = json.loads(text)["id"]
                    elif r.status in (429, 503) and attempt < 4:
                        with lock:
                            self.retries += 1
                        time.sleep(float(r.getheader("Retry-After") or 1))
                        continue
                    else:
                        self.errors.append(f"POST {path} #{i}: {r.status} {text[:200]!r}")
                    break
            conn.close()

        threads = [threading.Thread(target=worker, args=(self.ports[c % len(self.ports)],))
                   for c in range(self.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in started:
            t.join()
        return ids


def scim_call(port, token, method, path, body):
    """One SCIM request on a connection of its own: (status, parsed body or None)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, "/scim/v2" + path, json.dumps(body).encode(),
              {"Authorization": "Bearer " + token, "Content-Type": "application/scim+json",
               "Accept": "application/scim+json"})
    r = c.getresponse()
    text = r.read()
    c.close()
    return r.status, (json.loads(text) if text else None)


def quote_locator(value):
    return urllib.parse.quote(value, safe="")


class Probes:
    """Pushes made during the load, each timed until TeamCity shows it: a deactivation of a
    user TeamCity already has (until the bridge's deactivated marker is on it, i.e. the whole
    offboarding done), an existing user added to an existing group (until TeamCity lists the
    group among the user's), and a new user (until TeamCity has a user of that name). The
    three are pushed at once; TeamCity is polled every 50 ms, and the polls are left out of
    the load's call figures."""

    GROUP = "probe-group"
    PHASES = ("users", "groups")

    def __init__(self, emu, port, token):
        self.emu, self.port, self.token = emu, port, token
        self.ids = {}
        self.group_id = None
        self.results = []  # (phase, what, seconds or None, pending rows at the push)
        self.lock = threading.Lock()

    @staticmethod
    def name(role, phase):
        return f"probe.{role}.{phase}@contoso.example"

    def setup(self, outbox, timeout=120.0):
        """The users and the group TeamCity already has before the load; waits until synced."""
        for phase in self.PHASES:
            for role in ("leaver", "joiner"):
                st, body = scim_call(self.port, self.token, "POST", "/Users", {
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "userName": self.name(role, phase), "active": True})
                if st != 201:
                    raise SystemExit(f"probe setup: POST /Users {st} {body}")
                self.ids[(role, phase)] = body["id"]
        st, body = scim_call(self.port, self.token, "POST", "/Groups", {
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": self.GROUP, "members": []})
        if st != 201:
            raise SystemExit(f"probe setup: POST /Groups {st} {body}")
        self.group_id = body["id"]
        deadline = time.monotonic() + timeout
        while outbox.counts().get("pending", 0):
            if time.monotonic() > deadline:
                raise SystemExit("the probes' users did not reach TeamCity")
            time.sleep(0.2)
        for phase in self.PHASES:
            for role in ("leaver", "joiner"):
                st, _ = self.emu.probe("/users/username:" + quote_locator(self.name(role, phase)),
                                       "GET /app/rest/users/{u}")
                if st != 200:
                    raise SystemExit(f"probe setup: TeamCity has no {self.name(role, phase)}")

    def wait(self, t0, check, limit=900.0):
        while time.monotonic() - t0 < limit:
            if check():
                return time.monotonic() - t0
            time.sleep(0.05)
        return None

    def run(self, phase, outbox):
        """The three pushes of `phase`, timed (meant to run in a thread during the load)."""
        pending = outbox.counts().get("pending", 0)
        t0 = time.monotonic()

        def deactivate():
            st, body = scim_call(self.port, self.token, "PATCH", "/Users/" + self.ids[("leaver", phase)], {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": "active", "value": False}]})
            if st != 200:
                return f"PATCH {st} {body}"
            loc = "/users/username:" + quote_locator(self.name("leaver", phase))
            return self.wait(t0, lambda: self.emu.probe(
                loc + "/properties/teamcity-scim.deactivated",
                "GET /app/rest/users/{u}/properties/{name}", "text/plain") == (200, b"true"))

        def join():
            st, body = scim_call(self.port, self.token, "PATCH", "/Groups/" + self.group_id, {
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "add", "path": "members",
                                "value": [{"value": self.ids[("joiner", phase)]}]}]})
            if st not in (200, 204):
                return f"PATCH {st} {body}"
            loc = "/users/username:" + quote_locator(self.name("joiner", phase)) + "/groups"

            def has_group():
                st, text = self.emu.probe(loc, "GET /app/rest/users/{u}/groups")
                return st == 200 and any(g.get("name") == self.GROUP
                                         for g in json.loads(text).get("group", []))
            return self.wait(t0, has_group)

        def create():
            st, body = scim_call(self.port, self.token, "POST", "/Users", {
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": self.name("new", phase), "active": True})
            if st != 201:
                return f"POST {st} {body}"
            loc = "/users/username:" + quote_locator(self.name("new", phase))
            return self.wait(t0, lambda: self.emu.probe(loc, "GET /app/rest/users/{u}")[0] == 200)

        def timed(what, f):
            took = f()
            shown = took if isinstance(took, str) else (
                "NOT within 900 s" if took is None else f"{took:.2f} s")
            print(f"  probe ({phase} push, {pending:,} rows pending): {what} reached TeamCity "
                  f"after {shown}", file=sys.stderr)
            with self.lock:
                self.results.append((phase, what, took, pending))

        threads = [threading.Thread(target=timed, args=(k, f))
                   for k, f in (("a deactivation", deactivate), ("a membership", join),
                                ("a new user", create))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def read_token(out_path, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(out_path) as f:
            m = re.search(r"tcscim_[A-Za-z0-9_-]+", f.read())
        if m:
            return m.group(0)
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode} before printing a token")
        time.sleep(0.1)
    raise SystemExit("serve printed no initial SCIM token")


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_parts(pid):
    """RssAnon / RssFile / RssShmem from /proc/PID/status, as text."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return "-"
    parts = re.findall(r"^(RssAnon|RssFile|RssShmem):\s+(\d+) kB", text, re.M)
    return ", ".join(f"{k[3:].lower()} {int(v) / 1024:.1f}" for k, v in parts)


def mb(kb):
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/teamcity-scim")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=None, help="default: users / 10")
    ap.add_argument("--groups-per-user", type=int, default=5)
    ap.add_argument("--latency-ms", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8, help="teamcity.max_concurrency")
    ap.add_argument("--connections", type=int, default=16, help="SCIM client connections")
    ap.add_argument("--policy-group", default="tc-group-00000",
                    help="displayName the one policy rule matches (PROJECT_VIEWER@p:_Root)")
    ap.add_argument("--policy-match", choices=["displayName", "externalId"], default="displayName",
                    help="match the rule's group by displayName (its first match is pinned by "
                         "one whole pass) or by the externalId of --policy-group")
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="longest wait for convergence after the last push, in seconds")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--pg", help="a PostgreSQL server URL (postgres://user@host:port): serve on a new database there")
    ap.add_argument("--replicas", type=int, default=1, help="serve processes (with --pg)")
    ap.add_argument("--rss-trace", help="write the RSS samples (seconds from the first push, MB) to this file")
    ap.add_argument("--probe-at", type=float, default=0.4,
                    help="fraction of each push (users, then groups) at which the probes are pushed; "
                         "0 for none")
    ap.add_argument("--env", action="append", default=[],
                    help="extra KEY=VALUE for serve's environment (repeatable)")
    args = ap.parse_args()
    n_users = args.users
    n_groups = args.groups if args.groups is not None else max(1, n_users // 10)
    per_user = min(args.groups_per_user, n_groups)
    binary = os.path.abspath(args.bin)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"{binary} is not an executable (build: cargo build --release -p teamcity-scim)")

    if args.replicas > 1 and not args.pg:
        raise SystemExit("--replicas needs --pg (SQLite is one process)")
    work = tempfile.mkdtemp(prefix="first-load-")
    emu_proc = serve_proc = None
    serve_procs = []
    pg_db = None
    try:
        # 1. The emulator.
        tc_token = "bench-" + uuid.uuid4().hex
        emu_port = free_port()
        emu_proc = subprocess.Popen(
            [binary, "emulator", "--port", str(emu_port), "--token", tc_token,
             "--latency-ms", str(args.latency_ms)],
            stdout=open(os.path.join(work, "emulator.out"), "w"), stderr=subprocess.STDOUT)
        wait_http(emu_port, "/__emulator/health", "the emulator", emu_proc)
        emu = Emulator(emu_port, tc_token)

        # 2. serve on a fresh SQLite file, one policy rule on one group.
        db_path = os.path.join(work, "scim.db")
        db_url = f"sqlite://{db_path}"
        if args.pg:
            pg_db = "first_load_" + uuid.uuid4().hex[:8]
            subprocess.run(["psql", f"{args.pg}/postgres", "-qc", f"CREATE DATABASE {pg_db}"],
                           check=True, capture_output=True)
            db_url = f"{args.pg}/{pg_db}"
        config_path = os.path.join(work, "config.toml")
        m = re.fullmatch(r"tc-group-(\d+)", args.policy_group)
        policy_value = (group_external_id(int(m.group(1))) if args.policy_match == "externalId" and m
                        else args.policy_group)
        with open(config_path, "w") as f:
            f.write(f"""[database]
url = "{db_url}"

[teamcity]
url = "http://127.0.0.1:{emu_port}"
token = "{tc_token}"
max_concurrency = {args.concurrency}

[[policy.groups]]
name = "viewers"
match = {{ {args.policy_match} = "{policy_value}" }}
roles = ["PROJECT_VIEWER@p:_Root"]

[policy.defaults]
roles = []
""")
        ports = []
        token = None
        for r in range(max(1, args.replicas)):
            port = free_port()
            env = dict(os.environ)
            env.update({
                "TEAMCITY_SCIM_SERVER__LISTEN": f"127.0.0.1:{port}",
                "TEAMCITY_SCIM_ADMIN__LISTEN": "",
                "TEAMCITY_SCIM_SERVER__RATE_LIMIT_PER_SECOND": "0",
                "RUST_LOG": os.environ.get("RUST_LOG", "warn"),
            })
            for kv in args.env:
                k, _, v = kv.partition("=")
                env[k] = v
            out_path = os.path.join(work, f"serve{r}.out")
            proc = subprocess.Popen([binary, "--config", config_path, "serve"],
                                    stdout=open(out_path, "w"),
                                    stderr=open(os.path.join(work, f"serve{r}.err"), "w"), env=env)
            serve_procs.append(proc)
            wait_http(port, "/healthz/live", "serve", proc)
            if token is None:
                # The first process on an empty database prints the initial token; the
                # others share it through the database.
                token = read_token(out_path, proc)
            ports.append(port)
        serve_proc = serve_procs[0]
        time.sleep(1.0)  # let the startup checks (policy against TeamCity) finish
        startup_reads, startup_writes, _ = split_counters(emu.counters())
        rss_start, _ = rss_kb(serve_proc.pid)
        outbox = PgOutbox(db_url) if args.pg else Outbox(db_path)
        probes = None
        if args.probe_at > 0:
            probes = Probes(emu, ports[-1], token)
            probes.setup(outbox)

        # Bodies prepared before the clock starts.
        rng = random.Random(20261207)
        users = [user_body(i, rng) for i in range(n_users)]
        memberships = [[] for _ in range(n_groups)]
        for i in range(n_users):
            for g in rng.sample(range(n_groups), per_user):
                memberships[g].append(i)

        samplers = [RssSampler(p.pid) for p in serve_procs]
        for smp in samplers:
            smp.start()
        sampler = samplers[0]
        emu.reset_counters()
        emu.probes.clear()  # the setup's polls were before the reset
        probe_threads = []

        def probe_hook(phase):
            def start():
                t = threading.Thread(target=probes.run, args=(phase, outbox), daemon=True)
                t.start()
                probe_threads.append(t)
            return start

        def hooks(phase, n):
            return {int(args.probe_at * n): probe_hook(phase)} if probes else {}
        pusher = Pusher(ports, token, args.connections)

        # 3. The push: users, then groups with their members.
        t0 = time.monotonic()
        user_ids = pusher.run("/Users", users, hooks("users", n_users))
        t_users = time.monotonic()
        if pusher.errors:
            raise SystemExit("user push failed:\n  " + "\n  ".join(pusher.errors[:10]))
        del users
        groups = [group_body(g, [user_ids[i] for i in memberships[g]], rng)
                  for g in range(n_groups)]
        t_groups0 = time.monotonic()
        group_ids = pusher.run("/Groups", groups, hooks("groups", n_groups))
        t_last = time.monotonic()
        if pusher.errors:
            raise SystemExit("group push failed:\n  " + "\n  ".join(pusher.errors[:10]))
        n_members = sum(len(m) for m in memberships)
        del groups
        print(f"pushed {n_users} users in {t_users - t0:.1f} s, {n_groups} groups "
              f"({n_members} memberships) in {t_last - t_groups0:.1f} s; waiting for TeamCity",
              file=sys.stderr)

        # 4. Convergence: nothing pending in the outbox (polled every 0.2 s).
        last_report = 0.0
        while True:
            for p in serve_procs:
                if p.poll() is not None:
                    raise SystemExit(f"serve exited with {p.returncode} during the load")
            counts = outbox.counts()
            now = time.monotonic()
            if counts.get("pending", 0) == 0:
                t_conv = now
                break
            if now - t_last > args.timeout:
                raise SystemExit(f"no convergence {args.timeout:.0f} s after the last push: {counts}")
            if now - last_report >= 10:
                last_report = now
                print(f"  {now - t0:6.1f} s: outbox {counts}", file=sys.stderr)
            time.sleep(0.2)
        for t in probe_threads:
            t.join()
        counters = emu.counters()
        peak_load = max((smp.peak_between(t0, t_conv) or 0 for smp in samplers), default=None)
        hwm_load = max((rss_kb(p.pid)[1] or 0 for p in serve_procs), default=None)
        reads, writes, by_route = split_counters(counters)
        # The probes' polls are not the load's calls.
        probe_reads = sum(emu.probes.values())
        for route, n in emu.probes.items():
            by_route[route] = by_route.get(route, 0) - n
        reads -= probe_reads
        # The emulator holds the users and groups (these reads come after the snapshot).
        tc_users = emu.get("/app/rest/users?fields=count")["count"]
        tc_groups = emu.get("/app/rest/userGroups?fields=count")["count"]
        final_counts = outbox.counts()
        errors = []
        if final_counts.get("dead", 0) or final_counts.get("held", 0):
            errors.append(f"outbox after the load: {final_counts}")
        # The emulator has its admin user and the ALL_USERS_GROUP of its own; the bridge adds
        # a group per SCIM group (and maybe a defaults group).
        if tc_users < n_users:
            errors.append(f"TeamCity has {tc_users} users, expected {n_users} (+ admin)")
        if tc_groups < n_groups:
            errors.append(f"TeamCity has {tc_groups} groups, expected {n_groups} (+ its own)")

        # 5. Idle RSS.
        print(f"converged; {args.idle_seconds:.0f} s idle", file=sys.stderr)
        time.sleep(args.idle_seconds)
        idle = [(rss_kb(p.pid)[0] or 0, p.pid) for p in serve_procs]
        rss_idle, idle_pid = max(idle)
        idle_parts = rss_parts(idle_pid)
        for smp in samplers:
            smp.stop_flag.set()
        if args.rss_trace:
            with open(args.rss_trace, "w") as f:
                for t, r in list(sampler.samples):
                    f.write(f"{t - t0:.1f} {r / 1024:.1f}\n")
        idle_reads, idle_writes, _ = split_counters(emu.counters())
        idle_reads -= probe_reads
    finally:
        for p in serve_procs:
            stop(p)
        stop(emu_proc)
        if pg_db:
            subprocess.run(["psql", f"{args.pg}/postgres", "-qc",
                            f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)"], capture_output=True)
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    # 6. The table.
    calls = reads + writes
    ideal = calls * args.latency_ms / 1000 / args.concurrency
    from_first = t_conv - t0
    from_last = t_conv - t_last
    ratio = from_first / ideal if ideal else float("nan")
    call_target = 1.05 * n_users + n_groups
    user_routes = {k: v for k, v in by_route.items() if "/users" in k}
    group_routes = {k: v for k, v in by_route.items() if "/userGroups" in k}
    per_user = sum(user_routes.values()) / n_users
    per_group = sum(group_routes.values()) / n_groups
    met = lambda ok: "met" if ok else "NOT met"
    rows = [
        ("users / groups / memberships", f"{n_users:,} / {n_groups:,} / {n_members:,}", "", ""),
        ("database", ("PostgreSQL, %d replica(s)" % len(serve_procs)) if args.pg else "SQLite", "", ""),
        ("SCIM connections; TeamCity latency, concurrency",
         f"{args.connections}; {args.latency_ms} ms, {args.concurrency}", "", ""),
        ("push: POST /Users", f"{n_users / (t_users - t0):,.0f} users/s ({t_users - t0:.1f} s)", "", ""),
        ("push: POST /Groups (members inline)",
         f"{n_groups / (t_last - t_groups0):,.0f} groups/s, {n_members / (t_last - t_groups0):,.0f} members/s ({t_last - t_groups0:.1f} s)", "", ""),
        ("push retries (429/503/reset)", f"{pusher.retries}", "", ""),
        ("TeamCity calls at startup (before the push)", f"{startup_reads} reads, {startup_writes} writes", "", ""),
        ("TeamCity calls for the load", f"{calls:,} = {reads:,} reads + {writes:,} writes",
         f"<= {call_target:,.0f} (1.05/user + 1/group)", met(calls <= call_target)),
        ("calls on /users routes per user", f"{per_user:.3f}", "", ""),
        ("calls on /userGroups routes per group", f"{per_group:.3f}", "", ""),
        ("ideal: calls x latency / concurrency", f"{ideal:.1f} s", "", ""),
        ("converged, from the first push", f"{from_first:.1f} s = {ratio:.2f} x ideal",
         "<= 1.2 x ideal", met(ratio <= 1.2)),
        ("converged, from the last push", f"{from_last:.1f} s", "", ""),
        ("serve VmRSS at start (empty)", mb(rss_start), "", ""),
        ("serve VmRSS peak under load (0.5 s samples)", mb(peak_load), "<= 200 MB",
         met(peak_load is not None and peak_load <= 200 * 1024)),
        ("serve VmHWM at convergence", mb(hwm_load), "", ""),
        (f"serve VmRSS after {args.idle_seconds:.0f} s idle", f"{mb(rss_idle)} ({idle_parts})", "<= 64 MB",
         met(rss_idle is not None and rss_idle <= 64 * 1024)),
        ("TeamCity calls while idle", f"{idle_reads - reads} reads, {idle_writes - writes} writes"
         " (incl. the 2 count reads)", "", ""),
        ("TeamCity after: users / groups", f"{tc_users:,} / {tc_groups:,}", "", ""),
    ]
    for phase, what, took, pending in (probes.results if probes else []):
        ok = isinstance(took, float) and took < 5
        shown = took if isinstance(took, str) else ("not within 900 s" if took is None else f"{took:.2f} s")
        rows.append((f"{what} pushed {args.probe_at:.0%} into the {phase} push reaches TeamCity",
                     f"{shown} ({pending:,} rows pending at the push)", "< 5 s", met(ok)))
        if isinstance(took, str):
            errors.append(f"probe {what} ({phase}): {took}")
    print("| measurement | measured | target | |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nTeamCity calls by route:")
    for k, v in sorted(by_route.items(), key=lambda kv: -kv[1]):
        print(f"  {v:>9,}  {k}")
    if errors:
        print("\nERRORS:\n  " + "\n  ".join(errors), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
