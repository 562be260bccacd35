"""Kernel start on the docker and docker-swarm pools, against its floor: `docker run` of the same
image with the same kernel, driven by jupyter_client.

    python -m bench.container_start [--starts 5] [--warm]

Needs dockerd, a single-node Swarm and the kernel image (docker/build-images.sh). Each start is
timed from the request (floor: `docker run`; poolgate: `POST /api/kernels`) to the first
kernel_info_reply; the kernel is removed before the next. Prints p50 and max per target and the
ratio to the floor. poolgate runs as `poolgate serve` with a docker pool (host network) and a
docker-swarm pool, on its own data folder and port. ``--warm`` adds a docker and a docker-swarm
pool that keep one warm kernel each (workers/warm.py): each of their starts waits until
/api/pools shows it ready (untimed), and its ratio to the cold start of the same launcher is
printed.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import websocket
import yaml
from jupyter_client import BlockingKernelClient

IMAGE = "poolgate/kernel:latest"
ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def floor_start(folder: Path) -> float:
    """`docker run` of the kernel image on the host network, to the first kernel_info_reply."""
    shell, iopub, stdin, control, hb = free_ports(5)
    info = {"shell_port": shell, "iopub_port": iopub, "stdin_port": stdin,
            "control_port": control, "hb_port": hb, "ip": "127.0.0.1", "key": uuid.uuid4().hex,
            "transport": "tcp", "signature_scheme": "hmac-sha256"}
    (folder / "c.json").write_text(json.dumps(info))
    (folder / "c.json").chmod(0o666)  # the image's user: ipykernel writes the file back
    name = f"pg-bench-floor-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "--network", "host",
                    "-v", f"{folder}:/conn", IMAGE, "python3", "-m", "ipykernel_launcher",
                    "-f", "/conn/c.json"], check=True, capture_output=True)
    client = BlockingKernelClient()
    client.load_connection_info(info)
    client.start_channels()
    try:  # (wait_for_ready takes a silent heartbeat for a dead kernel while it starts)
        mid = client.kernel_info()  # held by ZMQ until the kernel binds
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = client.get_shell_msg(timeout=1)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == mid:
                return time.monotonic() - t0
        raise RuntimeError("the floor's kernel did not answer within 60 s")
    finally:
        client.stop_channels()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def poolgate_start(base: str, spec: str) -> float:
    """POST /api/kernels to the first kernel_info_reply on its WebSocket; then DELETE."""
    t0 = time.monotonic()
    r = requests.post(f"{base}/api/kernels", json={"name": spec}, timeout=120)
    r.raise_for_status()
    kid = r.json()["id"]
    try:
        ws = websocket.create_connection(base.replace("http", "ws", 1) +
                                         f"/api/kernels/{kid}/channels", timeout=60)
        mid = uuid.uuid4().hex
        ws.send(json.dumps({"header": {"msg_id": mid, "msg_type": "kernel_info_request",
                                       "session": "bench", "username": "bench",
                                       "date": "2026-01-01T00:00:00Z", "version": "5.3"},
                            "parent_header": {}, "metadata": {}, "content": {},
                            "channel": "shell"}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") == mid and \
                    msg["msg_type"] == "kernel_info_reply":
                took = time.monotonic() - t0
                break
        ws.close()
        return took
    finally:
        requests.delete(f"{base}/api/kernels/{kid}", timeout=60)


WARM = {"py-docker-warm": "docker-warm", "py-swarm-warm": "swarm-warm"}  # spec -> its pool


def wait_warm(base: str, spec: str) -> None:
    """Until the spec's pool shows its warm kernel ready (before a warm start; not timed)."""
    deadline = time.monotonic() + 120
    while requests.get(f"{base}/api/pools/{WARM[spec]}", timeout=10).json()[
            "warm_ready"].get(spec, 0) < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"no warm {spec} kernel ready after 120 s")
        time.sleep(0.05)


def start_serve(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    specs = folder / "specs"
    for name, pool in (("py-docker", "docker"), ("py-swarm", "swarm"), *WARM.items()):
        (specs / name).mkdir(parents=True)
        (specs / name / "kernel.json").write_text(json.dumps({
            "argv": ARGV, "display_name": name, "language": "python",
            "metadata": {"poolgate": {"pool": pool}}}))
    options = {"image": IMAGE, "labels": {"poolgate.bench": "1"}}
    cfg = {"default_pool": "docker", "default_kernelspec": "py-docker",
           "kernelspec_dirs": [str(specs)],
           "pools": {"local": {"launcher": "local", "slots": 1},  # the packaged python3 spec's
                     "docker": {"launcher": "docker", "slots": 4,
                                "options": {**options, "network": "host"}},
                     "swarm": {"launcher": "docker-swarm", "slots": 4, "options": options},
                     "docker-warm": {"launcher": "docker", "slots": 4, "warm": {
                         "py-docker-warm": 1}, "options": {**options, "network": "host"}},
                     "swarm-warm": {"launcher": "docker-swarm", "slots": 4, "warm": {
                         "py-swarm-warm": 1}, "options": options}}}
    (folder / "queues.yaml").write_text(yaml.safe_dump(cfg))
    port = free_ports(1)[0]
    exe = Path(sys.executable).parent / "poolgate"
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen([str(exe) if exe.exists() else "poolgate", "serve", "--config",
                             str(folder / "queues.yaml"), "--port", str(port), "--data-dir",
                             str(folder / "data")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while b"poolgate is ready at" not in (folder / "serve.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("poolgate serve did not start:\n" +
                             (folder / "serve.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def report(name: str, times: list[float], floor: list[float]) -> str:
    p50, f50 = statistics.median(times), statistics.median(floor)
    return (f"{name:<22} p50 {p50:6.2f} s (×{p50 / f50:.2f})   max {max(times):6.2f} s "
            f"(×{max(times) / max(floor):.2f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=5, help="starts per target (default 5)")
    p.add_argument("--warm", action="store_true",
                   help="also start on pools that keep a warm kernel")
    args = p.parse_args()
    if shutil.which("docker") is None:
        raise SystemExit("docker is not installed")
    folder = Path(tempfile.mkdtemp(prefix="pg-bench-containers-"))
    os.chmod(folder, 0o777)
    proc, base = start_serve(folder)
    results: dict[str, list[float]] = {"floor (docker run)": [], "poolgate docker": [],
                                       "poolgate docker-swarm": []}
    try:
        for _ in range(args.starts):  # round by round: the machine's speed drifts
            results["floor (docker run)"].append(floor_start(folder))
            results["poolgate docker"].append(poolgate_start(base, "py-docker"))
            results["poolgate docker-swarm"].append(poolgate_start(base, "py-swarm"))
            for spec, name in (("py-docker-warm", "poolgate docker warm"),
                               ("py-swarm-warm", "poolgate docker-swarm warm")):
                if args.warm:
                    wait_warm(base, spec)
                    results.setdefault(name, []).append(poolgate_start(base, spec))
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(folder, ignore_errors=True)
    floor = results["floor (docker run)"]
    print(f"kernel start, request → first kernel_info_reply, {args.starts} starts each")
    for name, times in results.items():
        print(report(name, times, floor))
    for cold in ("poolgate docker", "poolgate docker-swarm"):
        if f"{cold} warm" in results:
            warm, base_p50 = statistics.median(results[f"{cold} warm"]), statistics.median(
                results[cold])
            print(f"{cold} warm / cold: start p50 ×{warm / base_p50:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
