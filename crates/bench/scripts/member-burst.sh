#!/usr/bin/env bash
# Concurrent membership PATCHes to one group, as Okta and Entra push them: wrk with 32
# connections adding members to a group that already has 5,000, for 10 s. Prints wrk's
# summary; "Non-2xx" counts the answers that were not 200 (before the fix: 503s).
#
#   bash crates/bench/scripts/member-burst.sh [BINARY]   (default target/release/teamcity-scim)
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/NEW_EMPTY_DB bash …   (default: a temporary SQLite file)
set -euo pipefail
bin=${1:-target/release/teamcity-scim}
base_members=${BASE_MEMBERS:-5000}
pool=${POOL:-5000}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TEAMCITY_SCIM_DATABASE__URL="${DATABASE_URL:-sqlite://$work/b.db}" TEAMCITY_SCIM_SERVER__LISTEN="127.0.0.1:$port" \
  TEAMCITY_SCIM_ADMIN__LISTEN="" TEAMCITY_SCIM_SERVER__RATE_LIMIT_PER_SECOND=0 RUST_LOG=warn \
  "$bin" serve >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do grep -q tcscim_ "$work/out" 2>/dev/null && break; sleep 0.1; done
token=$(grep -o 'tcscim_[A-Za-z0-9_-]*' "$work/out" | head -1)
python3 - "$port" "$token" "$base_members" "$pool" "$work/patch.lua" <<'PY'
import json, sys, time, urllib.request, concurrent.futures as cf
port, token, base, pool, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
url = f"http://127.0.0.1:{port}/scim/v2"
def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/scim+json"})
    return json.load(urllib.request.urlopen(req))
def user(i):
    return post("/Users", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                           "userName": f"burst{i}@example.com", "active": True})["id"]
started = time.monotonic()
with cf.ThreadPoolExecutor(16) as ex:
    ids = list(ex.map(user, range(base + pool)))
took = time.monotonic() - started
print(f"seeding: {base + pool} POST /Users from 16 Python threads in {took:.1f} s ({(base + pool) / took:.0f}/s)", file=sys.stderr)
g = post("/Groups", {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Burst",
                     "members": [{"value": i} for i in ids[:base]]})["id"]
extra = ids[base:]
with open(out, "w") as f:
    f.write("local ids = {" + ",".join(f'"{i}"' for i in extra) + "}\n")
    f.write(f'local path = "/scim/v2/Groups/{g}"\n')
    f.write(f'local auth = "Bearer {token}"\n')
    f.write('''
local n = 0
request = function()
  n = n + 1
  local id = ids[(n * 7919 + math.random(#ids)) % #ids + 1]
  local body = '{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"add","path":"members","value":[{"value":"' .. id .. '"}]}]}'
  return wrk.format("PATCH", path, {["Authorization"] = auth, ["Content-Type"] = "application/scim+json"}, body)
end
''')
print(f"seeded {base + pool} users, group {g} with {base} members", file=sys.stderr)
PY
wrk -t2 -c32 -d10s --latency -s "$work/patch.lua" "http://127.0.0.1:$port"
