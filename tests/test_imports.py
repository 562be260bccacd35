"""The import rules of the layout (docs/architecture.md, "Imports"): imports run one way, and a
gateway process loads no worker back-end.

* No cycle among gateway/, workers/ and poolgate/, counting every ``import`` the source holds:
  at module level, inside functions, and under ``if TYPE_CHECKING:`` (a function-local import
  or a type-only one is no way out of a circle: use a ``typing.Protocol``, as workers/hosting.py
  and workers/resources.py do). Importing ``a.b.c`` also runs ``a`` and ``a.b``, so those count.
  ``importlib.import_module`` with a name from a table (the launcher registries) is not an
  import of the source and does not count: that is how a registry stays lazy.
* ``import poolgate.gateway.app``, loading a queues.yaml with a pool of every launcher kind and building
  the gateway's Celery app, in a fresh interpreter, leaves out every launcher module, the
  worker's runtime and supervisor, and the back-end libraries behind the launchers.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "workers", "poolgate")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if pkg != "poolgate":  # gateway/ and workers/ install as poolgate.gateway, .workers
                parts = ("poolgate", *parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path) -> set[str]:
    """Every dotted name ``name``'s source imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules (and their parent packages) importing it runs."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for target in _imported(name, path):
            while target and target not in mods:  # "from pkg import name": the module pkg
                target = target.rpartition(".")[0]
            parent = target
            while parent:  # importing a.b.c runs a and a.b first
                if parent in mods and parent != name and not name.startswith(parent + "."):
                    edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path (first node repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_graph_sees_imports_wherever_they_are() -> None:
    graph = import_graph()
    assert "poolgate.workers.supervisor" in graph["poolgate.workers.runtime"]  # module level
    assert "poolgate.workers.config" in graph["poolgate.workers.launchers"]  # under TYPE_CHECKING
    assert "poolgate.gateway.server" in graph["poolgate.cli"]  # inside a function
    # gateway.api.pools runs gateway.api first
    assert "poolgate.gateway.api" in graph["poolgate.admin"]


def test_find_cycle_reports_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, ("import cycle: " + " -> ".join(cycle) + "; make the imports run one way "
                       "(move the shared part into a module both import, or type with a Protocol)")


# Back-end libraries only pool workers need: docker (docker SDK), kubernetes, paramiko (ssh),
# psutil (local and gpu kernels' processes), requests (the docker SDK and the YARN client).
# pyzmq is not here: the gateway itself sends interrupt_request with workers/kernel_socket.py.
WORKER_ONLY = ("docker", "kubernetes", "paramiko", "psutil", "requests")
# In workers/ the gateway may load: the pure modules, the launchers' *_builders, the registry
# secrets it decrypts kernel keys with (keyring), the broker's TLS options (broker_tls), and the
# Celery app it sends tasks with (celery_app, and tasks, whose bodies import the supervisor when
# they run in a worker).
SHARED = {f"poolgate.workers{m}" for m in (
    "", ".config", ".errors", ".protocol", ".jmsg", ".registry", ".resources", ".typed",
    ".launcher_options", ".gpus", ".kernel_socket", ".logs", ".reconcile", ".launchers",
    ".celery_app", ".tasks", ".keyring", ".broker_tls")}

QUEUES = """
pools:
  local: {launcher: local}
  gpu: {launcher: gpu, options: {discover: list, gpus: ["0"]}}
  ssh: {launcher: ssh, options: {hosts: [{name: h1, address: 127.0.0.1}],
                                 port_range: "50000-50999"}}
  docker: {launcher: docker}
  swarm: {launcher: docker-swarm}
  yarn: {launcher: yarn, options: {rm_address: "http://127.0.0.1:8088"}}
  k8s: {launcher: kubernetes}
"""


def test_gateway_and_config_load_no_worker_backend(tmp_path: Path) -> None:
    (tmp_path / "queues.yaml").write_text(QUEUES)
    code = textwrap.dedent(f"""
        import json, sys
        import poolgate.gateway.app
        from poolgate.gateway.dispatch import Dispatcher
        from poolgate.workers import launchers
        from poolgate.workers.config import load_config
        config = load_config({str(tmp_path / "queues.yaml")!r}, environ={{}})
        assert {{p.launcher for p in config.pools.values()}} == set(launchers.LAUNCHERS)
        Dispatcher(config)  # create_app's Celery app, with its task definitions
        print(json.dumps(sorted(sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    backends = sorted(m for m in loaded if m.split(".")[0] in WORKER_ONLY)
    assert not backends, f"the gateway process loaded worker back-ends: {backends}"
    ours = sorted(m for m in loaded if m.startswith("poolgate.workers") and m not in SHARED
                  and not (m.startswith("poolgate.workers.launchers.") and m.endswith("_builders")))
    assert not ours, f"the gateway process loaded worker-only modules: {ours}"
