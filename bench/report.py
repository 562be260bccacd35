"""Medians over rounds, the final table with ×floor ratios, and the JSON file."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from bench.runner import TargetResult

# key -> (label, ratio shown). Keys matched by a pattern come after the fixed ones.
LABELS: dict[str, tuple[str, bool]] = {
    "start.p50_s": ("1 start → kernel_info p50 (s) ↓", True),
    "start.max_s": ("1 start → kernel_info max (s) ↓", True),
    "start.failures": ("1 start failures", False),
    "execute.p50_ms": ("2 execute 1+1 p50 (ms) ↓", True),
    "execute.p95_ms": ("2 execute 1+1 p95 (ms) ↓", True),
    "execute.p99_ms": ("2 execute 1+1 p99 (ms) ↓", True),
    "iopub.mb_s": ("3 iopub stdout (MB/s) ↑", True),
    "iopub.lost_bytes": ("3 iopub bytes lost", False),
    "iopub.timeouts": ("3 iopub timed out (rounds)", False),
    "iopub4m.msg_s": ("3 iopub 4 MiB flushed writes, aiohttp (msg/s) ↑", True),
    "iopub4m.wsc_msg_s": ("3 iopub 4 MiB flushed writes, websocket-client (msg/s) ↑", True),
    "iopub4m.lost_bytes": ("3 iopub 4 MiB bytes lost, aiohttp", False),
    "iopub4m.wsc_lost_bytes": ("3 iopub 4 MiB bytes lost, websocket-client", False),
    "iopub4m.gw_cpu_us": ("3 iopub 4 MiB gateway CPU per msg, aiohttp (µs) ↓", False),
    "iopub4m.wsc_gw_cpu_us": ("3 iopub 4 MiB gateway CPU per msg, websocket-client (µs) ↓",
                              False),
    "iopub64k.msg_s": ("3 iopub 64 KiB flushed writes, aiohttp (msg/s) ↑", True),
    "iopub64k.wsc_msg_s": ("3 iopub 64 KiB flushed writes, websocket-client (msg/s) ↑", True),
    "iopub64k.lost_bytes": ("3 iopub 64 KiB bytes lost, aiohttp", False),
    "iopub64k.wsc_lost_bytes": ("3 iopub 64 KiB bytes lost, websocket-client", False),
    "iopub64k.gw_cpu_us": ("3 iopub 64 KiB gateway CPU per msg, aiohttp (µs) ↓", False),
    "iopub64k.wsc_gw_cpu_us": ("3 iopub 64 KiB gateway CPU per msg, websocket-client (µs) ↓",
                               False),
    "iopub16k.msg_s": ("3 iopub 16 KiB flushed writes, aiohttp (msg/s) ↑", True),
    "iopub16k.wsc_msg_s": ("3 iopub 16 KiB flushed writes, websocket-client (msg/s) ↑", True),
    "iopub16k.lost_bytes": ("3 iopub 16 KiB bytes lost, aiohttp", False),
    "iopub16k.wsc_lost_bytes": ("3 iopub 16 KiB bytes lost, websocket-client", False),
    "iopub16k.gw_cpu_us": ("3 iopub 16 KiB gateway CPU per msg, aiohttp (µs) ↓", False),
    "iopub16k.wsc_gw_cpu_us": ("3 iopub 16 KiB gateway CPU per msg, websocket-client (µs) ↓",
                               False),
    "iopub_small.msg_s": ("3 iopub 10,000 small flushed writes, aiohttp (msg/s) ↑", True),
    "iopub_small.wsc_msg_s": ("3 iopub 10,000 small flushed writes, websocket-client (msg/s) ↑",
                              True),
    "iopub_small.lost_bytes": ("3 iopub small writes bytes lost, aiohttp", False),
    "iopub_small.wsc_lost_bytes": ("3 iopub small writes bytes lost, websocket-client", False),
    "iopub_small.gw_cpu_us": ("3 iopub small gateway CPU per msg, aiohttp (µs) ↓", False),
    "iopub_small.wsc_gw_cpu_us": ("3 iopub small gateway CPU per msg, websocket-client (µs) ↓",
                                  False),
    "busy.exec_per_s": ("5 busy kernels, executes/s ↑", True),
    "busy.failures": ("5 busy kernels, failed starts", False),
    "memory.gateway_mb_per_kernel": ("6 gateway process MB/kernel ↓", False),
    "memory.service_mb_per_kernel": ("6 all but kernels, MB/kernel ↓", False),
    "memory.tree_mb_per_kernel": ("6 MB/kernel incl. kernel processes ↓", False),
    "memory.idle_mb": ("6 gateway RSS idle (MB)", False),
    "memory.failures": ("6 memory, failed starts", False),
    "many.ready": ("8 many kernels: alive at once ↑", False),
    "many.failures": ("8 many kernels: failed starts", False),
    "many.exec_failures": ("8 many kernels: no answer to 1+1", False),
    "many.gateway_mb_per_kernel": ("8 many kernels: gateway MB/kernel ↓", False),
    "many.service_mb_per_kernel": ("8 many kernels: all but kernels, MB/kernel ↓", False),
    "many.gateway_fds": ("8 many kernels: gateway open files", False),
    "many.gateway_fd_limit": ("8 many kernels: gateway open-file limit", False),
}
PATTERNS: list[tuple[str, str, bool]] = [
    (r"concurrent\.k(\d+)\.all_ready_s", "4 {0} concurrent starts, all ready (s) ↓", True),
    (r"concurrent\.k(\d+)\.failures", "4 {0} concurrent starts, failures", False),
    (r"parallel\.k(\d+)\.p(\d+)_ms", "9 {0} kernels in parallel, 1+1 p{1} (ms) ↓", True),
    (r"parallel\.k(\d+)\.paced_p(\d+)_ms", "9 {0} kernels paced (--parallel-rate), 1+1 p{1} (ms) ↓", True),
    (r"parallel\.k(\d+)\.failures", "9 {0} kernels in parallel, failed starts", False),
    (r"parallel\.k(\d+)\.(kernel|gateway|client|other)_(cpu|wait)_ms",
     "9 {0} kernels in parallel, {1} {2} per round trip (ms, --parallel-sched) ↓", True),
    (r"launch\.timings", "7 launch hop (model's poolgate timings)", False),
    (r"launch\.(.+)@", "7 launch hop: {0} at (s after POST)", False),
    (r"launch\.(.+)", "7 launch hop: {0} (s)", False),
]


def floor_key(key: str) -> str:
    """The floor's metric a key is compared with: a second WebSocket client's figure
    (``wsc_``) with the floor's one, which has no WebSocket."""
    return key.replace(".wsc_", ".", 1)


def label(key: str) -> tuple[str, bool]:
    if key in LABELS:
        return LABELS[key]
    for pattern, text, ratio in PATTERNS:
        m = re.fullmatch(pattern, key)
        if m:
            return text.format(*m.groups()), ratio
    return key, False


def sort_key(key: str) -> tuple[str, int, int, str]:
    """By scenario number, then K, then the order of LABELS / PATTERNS."""
    text = label(key)[0]
    m = re.match(r"(?:concurrent|parallel)\.k(\d+)\.", key)
    order = list(LABELS).index(key) if key in LABELS else len(LABELS) + next(
        (i for i, (p, _, _) in enumerate(PATTERNS) if re.fullmatch(p, key)), len(PATTERNS))
    return text[:1], int(m.group(1)) if m else 0, order, text


def counted(key: str) -> bool:
    """Whether a metric counts failures: reported as the total over rounds, since the median
    of rounds hides a failure that happened in fewer than half of them."""
    return key.endswith("failures")


def medians(result: TargetResult) -> dict[str, float | None]:
    """Per metric, the median of the rounds that have a number (a count of failures: their
    total); None if none has."""
    keys = {k for r in result.rounds for k in r}
    out: dict[str, float | None] = {}
    for key in keys:
        values = [v for r in result.rounds if (v := r.get(key)) is not None]
        if not values:
            out[key] = None
        else:
            out[key] = float(sum(values)) if counted(key) else statistics.median(values)
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def cell(value: float | None, floor: float | None, ratio: bool) -> str:
    text = fmt(value)
    if ratio and value is not None and floor:
        text += f" (×{value / floor:.2f})"
    return text


def table(results: list[TargetResult]) -> str:
    """The scenario | target... table; unavailable targets get one line each below it."""
    meds = {r.name: medians(r) for r in results}
    floor = meds.get("floor", {})
    keys = sorted({k for m in meds.values() for k in m}, key=sort_key)
    if "launch.timings" in keys and sum(k.startswith("launch.") for k in keys) > 1:
        keys.remove("launch.timings")  # placeholder row, only while no target reports any
    header = ["scenario", *(r.name for r in results)]
    rows = [header]
    for key in keys:
        text, ratio = label(key)
        rows.append([text, *(cell(meds[r.name].get(key), floor.get(floor_key(key)), ratio)
                             if r.rounds else "—" for r in results)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for r in results:
        if r.status != "ok":
            lines.append(f"{r.name}: {r.status.splitlines()[0]}")
        for err in r.errors:
            lines.append(f"{r.name}: error: {err.splitlines()[0]}")
    lines += pair_ratios(meds)
    lines.append("↓ lower is better, ↑ higher is better; (×N) = value / floor's value; "
                 "values are medians over rounds, failures their total over all rounds.")
    return "\n".join(lines)


#: (target, the target it is compared with): the start with a warm kernel against a cold one
PAIRS = (("poolgate-warm", "poolgate"), ("poolgate-ssh-warm", "poolgate-ssh"))


def pair_ratios(meds: dict[str, dict[str, float]]) -> list[str]:
    """One line per pair in PAIRS that both ran: its start p50 as a ratio of the other's."""
    out = []
    for name, base in PAIRS:
        value, ref = meds.get(name, {}).get("start.p50_s"), meds.get(base, {}).get("start.p50_s")
        if value is not None and ref:
            out.append(f"{name} / {base}: start p50 {fmt(value)} / {fmt(ref)} s "
                       f"= ×{value / ref:.3f}")
    return out


def write_json(path: Path, results: list[TargetResult], meta: dict[str, Any]) -> None:
    doc = {"meta": meta, "targets": {
        r.name: {"status": r.status, "errors": r.errors, "seconds": r.seconds, "info": r.info,
                 "median": medians(r), "rounds": r.rounds} for r in results}}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
