"""JupyterLab 4 in headless Chromium (Debian's `chromium`, over the DevTools protocol) against
``jupyter lab --gateway-url`` pointing at a real poolgate stack, driven through JupyterLab's own
commands (``window.jupyterapp``, exposed with ``--LabApp.expose_app_in_browser``), as a user's
clicks and shortcuts drive it.

A user's notebook session: open a notebook on a poolgate kernel, run a cell, watch a cell's
lines arrive while it runs, interrupt a sleeping cell, restart (JupyterLab must show no
"Kernel Restarting ... appears to have died" dialog, the variable is gone, the next cell runs),
"Restart Kernel and Run All Cells", change the kernel, shut it down; and the page logs no
console error from the kernel connection. A cell that kills its kernel: JupyterLab's "appears
to have died" dialog, the kernel back under its id, the next cell run in it. Then the same user
behind two gateway replicas that a round-robin TCP proxy shares out, so every reconnect lands
on the other replica. An ipywidgets slider: rendered, moved by the kernel, typed into by the user.

The lab's user settings skip the "Restart Kernel?" confirmation (the user ticked "Do not ask
me again"), so any dialog seen while restarting is JupyterLab reacting to the kernel.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import requests

from tests.browser import Browser
from tests.conftest import Stack, free_port

# user settings of the lab under test: no restart confirmation, no news or update checks
SETTINGS = {
    "@jupyterlab/apputils-extension/sessionDialogs.jupyterlab-settings":
        {"skipKernelRestartDialog": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
}

CELLS = [
    "x = 6 * 7\nprint('out', x)\nx",
    "import time\nfor i in range(4):\n    print('line', i, flush=True)\n    time.sleep(0.7)",
    "import time\nprint('sleeping', flush=True)\ntime.sleep(120)",
    "print('x' in globals())",
    "import os\nprint(os.environ['KERNEL_ID'])",
]

# Installed in the page: reads JupyterLab's state, and records every dialog that appears and
# every kernel status the notebook's session goes through.
HELPER = r"""
window.pg = window.pg || (function () {
  const pg = {dialogs: [], statuses: [], connections: []};
  new MutationObserver(function (muts) {
    for (const m of muts) for (const n of m.addedNodes) {
      if (n.nodeType === 1 && (n.matches('.jp-Dialog') || n.querySelector('.jp-Dialog'))) {
        setTimeout(function () { pg.dialogs.push(n.innerText); }, 0);
      }
    }
  }).observe(document.body, {childList: true, subtree: true});
  pg.panel = function () {
    // the notebook in the main area (a headless page has no focus, so no currentWidget)
    const w = Array.from(window.jupyterapp.shell.widgets('main')).find(function (v) {
      return v.sessionContext && v.content; });
    if (!w) throw new Error('no notebook is open');
    if (!w._pgHooked) {
      w._pgHooked = true;
      w.sessionContext.statusChanged.connect(function (_, s) { pg.statuses.push(s); });
      w.sessionContext.connectionStatusChanged.connect(function (_, s) {
        pg.connections.push(s); });
    }
    return w;
  };
  pg.state = function () {
    const p = pg.panel(), sc = p.sessionContext, k = sc.session && sc.session.kernel;
    return JSON.stringify({
      kernel: k ? {id: k.id, name: k.name, status: k.status,
                   connection: k.connectionStatus} : null,
      busy: sc.isRestarting, dialogs: pg.dialogs,
      open: Array.from(document.querySelectorAll('.jp-Dialog')).map(function (d) {
        return d.innerText; }),
      statuses: pg.statuses, connections: pg.connections,
      cells: p.content.widgets.map(function (c) {
        return {source: c.model.sharedModel.getSource(), count: c.model.executionCount,
                outputs: c.model.outputs ? c.model.outputs.toJSON() : [],
                text: c.outputArea ? c.outputArea.node.innerText : ''}; })});
  };
  pg.run = function (i) {
    const p = pg.panel();
    p.content.activeCellIndex = i;
    p.content.deselectAll();
    window.jupyterapp.commands.execute('notebook:run-cell');
    return true;
  };
  pg.command = function (id) { window.jupyterapp.commands.execute(id); return true; };
  return pg;
})();
true
"""


class Lab:
    """``jupyter lab --gateway-url=URL`` with a temporary root, config, data and settings."""

    def __init__(self, tmp: Path, gateway_url: str, widgets: bool = True) -> None:
        """``widgets=False``: ipywidgets' JupyterLab extension turned off, as in a lab without
        ipywidgets (with it, the lab opens a widget-control comm on every kernel it connects
        to, and with that comm a subshell)."""
        self.root = tmp / "lab-root"
        self.root.mkdir()
        if not widgets:
            page_config = tmp / "lab-config" / "labconfig" / "page_config.json"
            page_config.parent.mkdir(parents=True)
            page_config.write_text(json.dumps(
                {"disabledExtensions": {"@jupyter-widgets/jupyterlab-manager": True}}))
        for name, value in SETTINGS.items():
            path = tmp / "lab-settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "lab-config"),
                   JUPYTER_DATA_DIR=str(tmp / "lab-data"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "lab-runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"))
        self.log_path = tmp / "jupyterlab.log"
        log = open(self.log_path, "wb")
        # poolgate.lab is enabled as a wheel install enables it (an editable one does not)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.token=",
             "--ServerApp.password=", f"--ServerApp.root_dir={self.root}",
             f"--gateway-url={gateway_url}", "--GatewayClient.request_timeout=120",
             "--LabApp.expose_app_in_browser=True",
             "--ServerApp.jpserver_extensions=poolgate.lab=True"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/api/kernelspecs", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"jupyter lab did not start:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def write_notebook(self, name: str, kernel: str = "python3",
                       cells: list[str] | None = None) -> None:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(src) for src in cells or CELLS]
        nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel,
                                     "language": "python"}
        nbformat.write(nb, self.root / name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Page:
    """The browser's JupyterLab tab, with the steps a test takes on its notebook."""

    def __init__(self, browser: Browser, lab: Lab, stack: Stack) -> None:
        self.browser = browser
        self.lab = lab
        self.stack = stack  # the poolgate behind the lab: its side goes into failures' messages

    def open(self, notebook: str) -> dict[str, Any]:
        self.browser.open(f"{self.lab.url}/lab/tree/{notebook}?reset", wait=60)
        self.browser.wait(lambda: self.browser.evaluate(
            "!!(window.jupyterapp && Array.from(window.jupyterapp.shell.widgets('main'))"
            ".some(function (w) { return w.sessionContext && w.content; }))"), 60,
            "JupyterLab to open the notebook")
        self.browser.evaluate(HELPER)
        return self.idle(60, "the notebook's kernel to start")

    def state(self) -> dict[str, Any]:
        return json.loads(self.browser.evaluate("pg.state()"))  # type: ignore[no-any-return]

    def idle(self, timeout: float = 30, what: str = "the kernel to be idle") -> dict[str, Any]:
        last: dict[str, Any] = {}

        def ready() -> dict[str, Any] | None:
            s = last["state"] = self.state()
            k = s["kernel"]
            ok = k and k["status"] == "idle" and k["connection"] == "connected"
            return s if ok else None
        try:
            return self.browser.wait(ready, timeout, what)  # type: ignore[no-any-return]
        except AssertionError:
            s = last.get("state", {})
            raise AssertionError(
                f"timed out waiting for {what}: kernel {s.get('kernel')}, statuses "
                f"{s.get('statuses')}, connection {s.get('connections')}, dialogs "
                f"{s.get('dialogs')}\n--- jupyter lab log:\n{self.lab.log()}\n"
                f"{self.stack.report()}") from None

    def run(self, index: int, timeout: float = 30) -> dict[str, Any]:
        """Run one cell and wait until it has finished (a new execution count, kernel idle)."""
        before = self.state()["cells"][index]["count"]
        self.browser.evaluate(f"pg.run({index})")
        last: dict[str, Any] = {}

        def ran() -> bool:
            s = last["state"] = self.state()
            return s["cells"][index]["count"] not in (None, before)
        try:
            self.browser.wait(ran, timeout, f"cell {index} to run")
        except AssertionError:
            s = last["state"]
            raise AssertionError(
                f"cell {index} got no execute_reply within {timeout} s: the cell shows "
                f"{s['cells'][index]}, kernel {s['kernel']}, statuses {s['statuses']}\n"
                f"{self.stack.report()}") from None
        return self.idle(timeout)["cells"][index]  # type: ignore[no-any-return]

    def shut_down(self) -> None:
        """JupyterLab's "Shut Down Kernel"; poolgate is left with no kernel."""
        self.command("notebook:shutdown-kernel")
        self.browser.wait(lambda: not self.stack.live_kernels(), 30,
                          "poolgate to have no kernel left")

    def command(self, command_id: str) -> None:
        self.browser.evaluate(f"pg.command({json.dumps(command_id)})")

    def no_dialog(self, seconds: float, what: str) -> dict[str, Any]:
        """Watch the page for ``seconds``: no dialog may appear."""
        end = time.monotonic() + seconds
        while True:
            s = self.state()
            assert not s["dialogs"] and not s["open"], (
                f"JupyterLab showed a dialog {what}: {s['dialogs'] or s['open']}; "
                f"kernel statuses seen: {s['statuses']}")
            if time.monotonic() > end:
                return s
            time.sleep(0.2)


def text_of(cell: dict[str, Any]) -> str:
    return "".join(o.get("text", "") for o in cell["outputs"] if o["output_type"] == "stream")


# Jupyter Server in gateway mode refuses the v1 kernel WebSocket subprotocol that JupyterLab
# asks for (GatewayWebSocketConnection.kernel_ws_protocol is "": it relays frames to the gateway
# as they are), so Chromium fails the first handshake, logs this, and JupyterLab connects again
# with the legacy protocol. Jupyter Server's doing, with any gateway; not poolgate's.
SUBPROTOCOL_REFUSED = "Sent non-empty 'Sec-WebSocket-Protocol' header but no response was received"


def kernel_errors(errors: list[str]) -> list[str]:
    """The console errors that concern kernels and their connections."""
    words = ("kernel", "websocket", "channels", "session", "/api/")
    return [e for e in errors if any(w in e.lower() for w in words)
            and SUBPROTOCOL_REFUSED not in e]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_jupyterlab_notebook_on_poolgate(redis_stack: Stack, browser: Browser,
                                         tmp_path: Path) -> None:
    lab = Lab(tmp_path, redis_stack.url)
    try:
        lab.write_notebook("nb.ipynb")
        page = Page(browser, lab, redis_stack)
        state = page.open("nb.ipynb")
        kid = state["kernel"]["id"]
        assert state["kernel"]["name"] == "python3"
        # the lab's server runs poolgate.lab (TCP_NODELAY on its kernel WebSockets)
        assert "poolgate.lab: kernel WebSockets send without delay" in lab.log_path.read_text()
        assert kid in [k["id"] for k in redis_stack.gw.kernels()]  # a poolgate kernel

        # a cell with output: stdout and the result
        cell = page.run(0)
        assert text_of(cell) == "out 42\n", cell
        assert [o["data"]["text/plain"] for o in cell["outputs"]
                if o["output_type"] == "execute_result"] == ["42"]
        assert "out 42" in cell["text"]  # and the page shows it

        # lines arrive while the cell runs, not all at the end
        browser.evaluate("pg.run(1)")
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = page.state()
            text = text_of(s["cells"][1])
            if not seen or seen[-1] != text:
                seen.append(text)
            if s["cells"][1]["count"] is not None and s["kernel"]["status"] == "idle" \
                    and "line 3" in text:
                break
            time.sleep(0.1)
        assert seen[-1] == "line 0\nline 1\nline 2\nline 3\n", seen
        partial = [t for t in seen if "line 0" in t and "line 3" not in t]
        assert len(partial) >= 2, f"the lines did not arrive one by one: {seen}"

        # interrupt a sleeping cell
        browser.evaluate("pg.run(2)")
        browser.wait(lambda: "sleeping" in json.dumps(page.state()["cells"][2]["outputs"]), 20,
                     "the cell to run (its first line shown)")
        started = time.monotonic()
        page.command("notebook:interrupt-kernel")
        state = page.idle(20, "the interrupted cell to stop")
        assert time.monotonic() - started < 15
        errors = [o for o in state["cells"][2]["outputs"] if o["output_type"] == "error"]
        assert [e["ename"] for e in errors] == ["KeyboardInterrupt"], state["cells"][2]
        assert page.run(3)["outputs"][0]["text"] == "True\n"  # the kernel kept its state

        # restart: no dialog, the variable is gone, the next cell runs, same kernel id
        page.command("notebook:restart-kernel")
        page.no_dialog(3, "when the user restarted the kernel")
        state = page.idle(60, "the restarted kernel")
        assert state["kernel"]["id"] == kid
        assert page.run(3)["outputs"][0]["text"] == "False\n"
        page.no_dialog(0, "after the restart")

        # Restart Kernel and Run All Cells (the sleeping cell edited to end at once)
        browser.evaluate("pg.panel().content.widgets[2].model.sharedModel.setSource("
                         "'time.sleep(0.1)')")
        page.command("notebook:restart-run-all")
        browser.wait(lambda: [c["count"] for c in page.state()["cells"]] == [1, 2, 3, 4, 5],
                     60, "all cells to run after the restart")
        state = page.idle(30)
        page.no_dialog(0, "on Restart Kernel and Run All Cells")
        cells = state["cells"]
        assert text_of(cells[0]) == "out 42\n" and text_of(cells[3]) == "True\n", cells
        assert text_of(cells[4]) == f"{kid}\n"

        # change the kernel: JupyterLab's "Select Kernel" dialog, poolgate's tiny-py spec
        page.command("notebook:change-kernel")
        browser.wait(lambda: browser.evaluate(
            "!!document.querySelector('.jp-Dialog select')"), 10, "the kernel selector")
        picked = browser.evaluate("""(function () {
            const sel = document.querySelector('.jp-Dialog select');
            const opt = Array.from(sel.options).find(o => o.value.indexOf('"tiny-py"') >= 0);
            if (!opt) return Array.from(sel.options).map(o => o.value).join(' | ');
            sel.value = opt.value;
            sel.dispatchEvent(new Event('change', {bubbles: true}));
            document.querySelector('.jp-Dialog .jp-mod-accept').click();
            return 'picked';
        })()""")
        assert picked == "picked", f"no tiny-py in the kernel selector: {picked}"
        browser.wait(lambda: (k := page.state()["kernel"]) and k["name"] == "tiny-py",
                     30, "the notebook to change kernel")
        browser.evaluate("pg.dialogs.length = 0")  # the Select Kernel dialog was ours
        state = page.idle(60, "the tiny-py kernel")
        new_kid = state["kernel"]["id"]
        assert new_kid != kid
        assert text_of(page.run(4)) == f"{new_kid}\n"
        live = {k["id"]: k["name"] for k in redis_stack.live_kernels()}
        assert live.get(new_kid) == "tiny-py", live

        # shut the kernel down
        page.shut_down()
        browser.wait(lambda: page.state()["kernel"] is None, 15,
                     "the notebook to show no kernel")
        page.no_dialog(0, "on shutdown")

        assert not kernel_errors(browser.errors), browser.errors
    finally:
        lab.stop()


def test_jupyterlab_after_a_cell_kills_the_kernel(redis_stack: Stack, browser: Browser,
                                                  tmp_path: Path) -> None:
    """A cell that ends the kernel's process: JupyterLab says so as it does on Jupyter Server's
    own kernels (its "appears to have died. It will restart automatically" dialog, from the
    ``restarting`` status the gateway sends), the kernel is back under the same id within
    seconds, and the next cell runs in it, with a fresh namespace."""
    lab = Lab(tmp_path, redis_stack.url)
    try:
        lab.write_notebook("crash.ipynb")
        page = Page(browser, lab, redis_stack)
        kid = page.open("crash.ipynb")["kernel"]["id"]
        assert text_of(page.run(0)) == "out 42\n"
        browser.evaluate("pg.panel().content.widgets[2].model.sharedModel.setSource("
                         "'import os\\nos._exit(1)')")
        browser.evaluate("pg.run(2)")
        try:
            browser.wait(lambda: any("appears to have died" in d and "restart automatically"
                                     in d for d in page.state()["dialogs"]), 20,
                         "JupyterLab's dialog for a kernel that died")
        except AssertionError:  # what JupyterLab saw, and the lab's log, for the next reader
            s = page.state()
            raise AssertionError(
                f"no 'died' dialog within 20 s: kernel {s['kernel']}, statuses "
                f"{s['statuses']}, connections {s['connections']}, dialogs {s['dialogs']}, "
                f"--- jupyter lab log:\n{lab.log()}\n{redis_stack.report()}") from None
        state = page.idle(30, "the kernel restarted after its death")
        assert state["kernel"]["id"] == kid
        assert "restarting" in state["statuses"]
        assert page.run(3)["outputs"][0]["text"] == "False\n"  # x is gone: a new process
        live = [k["id"] for k in redis_stack.live_kernels()]
        assert live == [kid], live
        assert not kernel_errors(browser.errors), browser.errors
        page.shut_down()
    finally:
        lab.stop()


# A notebook with a widget (ipywidgets 8; its JupyterLab extension, jupyterlab_widgets, comes
# with it): the kernel opens a comm per model, JupyterLab's widget manager answers and renders
# the slider, and each side's changes reach the other as comm messages.
WIDGET_CELLS = [
    "import ipywidgets as w\nseen = []\ns = w.IntSlider(value=5, description='n')\n"
    "s.observe(lambda change: seen.append(change['new']), 'value')\ns",
    "s.value = 7",
    "print(s.value, seen)",
]

# The slider's readout (its value as text) in the first cell's output.
READOUT = ("pg.panel().content.widgets[0].outputArea.node"
           ".querySelector('.widget-slider .widget-readout')")
# What a user does to it: type a number, press Enter.
TYPE_INTO_READOUT = r"""
(function () {
  const r = %s;
  r.textContent = '9';
  r.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', keyCode: 13, bubbles: true}));
  return true;
})()
""" % READOUT


def test_jupyterlab_widget_round_trip(redis_stack: Stack, browser: Browser,
                                      tmp_path: Path) -> None:
    """An ipywidgets slider through poolgate: JupyterLab renders it (the kernel's comm_open
    reached the page and the page's answers reached the kernel), a change made in the kernel
    moves it, and a value typed into it reaches the kernel's observer."""
    lab = Lab(tmp_path, redis_stack.url)
    try:
        lab.write_notebook("widget.ipynb", cells=WIDGET_CELLS)
        page = Page(browser, lab, redis_stack)
        page.open("widget.ipynb")

        def readout() -> str:
            return str(browser.evaluate(
                f"(function () {{ const r = {READOUT}; return r ? r.textContent : ''; }})()"))
        cell = page.run(0)
        assert [set(o["data"]) for o in cell["outputs"]] == [
            {"application/vnd.jupyter.widget-view+json", "text/plain"}], cell
        browser.wait(lambda: readout() == "5", 20, "JupyterLab to render the slider at 5")
        page.run(1)
        browser.wait(lambda: readout() == "7", 20, "the kernel's change to move the slider")
        browser.evaluate(TYPE_INTO_READOUT)
        browser.wait(lambda: readout() == "9", 20, "the typed value to show")
        deadline = time.monotonic() + 20
        while True:  # the change goes to the kernel's subshell: a cell may run before it
            out = text_of(page.run(2))
            if out == "9 [7, 9]\n" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert out == "9 [7, 9]\n", out
        assert not kernel_errors(browser.errors), browser.errors
        page.shut_down()
    finally:
        lab.stop()


# What JupyterLab's subshell console does (JupyterLab 4.4+): ask the notebook's kernel for a
# subshell, then send a cell to it on a clone of the kernel connection with its subshell id.
SUBSHELL = r"""
(function () {
  const k = pg.panel().sessionContext.session.kernel;
  pg.sub = {done: false, out: '', status: null, error: null, offered: k.supportsSubshells};
  k.requestCreateSubshell({}).done.then(function (reply) {
    const sub = k.clone({subshellId: reply.content.subshell_id});
    const f = sub.requestExecute(
      {code: 'import threading; print(threading.current_thread().name)'});
    f.onIOPub = function (m) {
      if (m.header.msg_type === 'stream') pg.sub.out += m.content.text; };
    return f.done.then(function (r) {
      pg.sub.status = r.content.status; pg.sub.done = true; sub.dispose(); });
  }).catch(function (e) { pg.sub.error = String(e); pg.sub.done = true; });
  return true;
})()
"""


def test_jupyterlab_subshell_while_a_cell_runs(redis_stack: Stack, browser: Browser,
                                               tmp_path: Path) -> None:
    """JupyterLab asks a poolgate kernel for a subshell while a notebook cell runs (as its
    subshell console and its widgets' comms do): the kernel, which forwarded its shell channel
    in C until then (README, "Forked kernels", Subshells), gives one at once, the subshell's
    cell runs and answers while the notebook's cell still runs, that cell then ends with its
    output, and the notebook's next cells run."""
    lab = Lab(tmp_path, redis_stack.url, widgets=False)  # no comm asks for a subshell first
    try:
        lab.write_notebook("sub.ipynb")
        page = Page(browser, lab, redis_stack)
        page.open("sub.ipynb")
        sources = ["print(get_ipython().kernel.shell_channel_thread.forwarding)",
                   "import time\ntime.sleep(8)\nprint('main done')"]
        for i, source in enumerate(sources):
            browser.evaluate(f"pg.panel().content.widgets[{i}].model.sharedModel"
                             f".setSource({json.dumps(source)})")
        assert text_of(page.run(0)) == "True\n"
        browser.evaluate("pg.run(1)")
        browser.wait(lambda: page.state()["kernel"]["status"] == "busy", 10,
                     "the notebook's cell to run")
        browser.evaluate(SUBSHELL)

        def subshell_done() -> dict[str, Any] | None:
            got: dict[str, Any] = json.loads(browser.evaluate("JSON.stringify(pg.sub)"))
            return got if got["done"] else None
        sub = browser.wait(subshell_done, 30, "the subshell's cell")
        assert (sub["offered"], sub["error"], sub["status"]) == (True, None, "ok"), sub
        assert sub["out"].startswith("subshell-"), sub
        # the notebook's cell still runs (it prints when it ends); JupyterLab's status shows
        # the subshell's idle, so it is not what tells
        state = page.state()
        assert (state["cells"][1]["outputs"], text_of(state["cells"][1])) == ([], ""), state
        # the gateway's model does: the subshell's idle is not the notebook cell's (its
        # supervisor reads iopub every 0.5 s, writes busy once it lasted 0.5 s, idle at once)
        kid = state["kernel"]["id"]
        redis_stack.gw.wait_state(kid, "busy", timeout=5)
        redis_stack.gw.holds_state(kid, "busy", 1.5, every=0.1)
        browser.wait(lambda: text_of(page.state()["cells"][1]) == "main done\n", 30,
                     "the notebook's cell to end with its output")
        page.idle()
        assert text_of(page.run(0)) == "False\n"  # ipykernel's loop from then on
        assert text_of(page.run(3)) == "False\n"
        assert not kernel_errors(browser.errors), browser.errors
    finally:
        lab.stop()


class RoundRobinProxy:
    """A loopback TCP proxy in front of gateway replicas, as a load balancer without
    stickiness: each new connection goes to the next replica. Kernel WebSockets (a GET of
    .../channels) take turns among themselves, so every reconnect lands on the other replica
    whatever REST calls came between."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.turns = {"channels": 0, "http": 0}
        self.routed: list[tuple[str, int]] = []  # (kind, backend port), in order
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def channels(self) -> list[int]:
        with self.lock:
            return [port for kind, port in self.routed if kind == "channels"]

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n" not in head and len(head) < 65536:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0]
            kind = "channels" if line.startswith(b"GET ") and b"/channels" in line else "http"
            with self.lock:
                port = self.backends[self.turns[kind] % len(self.backends)]
                self.turns[kind] += 1
                self.routed.append((kind, port))
            upstream = socket.create_connection(("127.0.0.1", port))
            with self.lock:
                self.sockets += [client, upstream]
            upstream.sendall(head)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side ended: end the connection both ways
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.server.close()
        with self.lock:
            for s in self.sockets:
                s.close()


def test_jupyterlab_behind_two_gateways(fresh_stack: Stack, browser: Browser,
                                        tmp_path: Path) -> None:
    """Two poolgate gateways on one registry behind a round-robin proxy: open, run, restart,
    run, reconnect (to the other replica), run, shut down."""
    second = free_port()
    fresh_stack.start_gateway(second)
    proxy = RoundRobinProxy([fresh_stack.port, second])
    lab = Lab(tmp_path, f"http://127.0.0.1:{proxy.port}")
    try:
        lab.write_notebook("nb.ipynb")
        page = Page(browser, lab, fresh_stack)
        kid = page.open("nb.ipynb")["kernel"]["id"]
        assert text_of(page.run(0)) == "out 42\n"

        page.command("notebook:restart-kernel")
        page.no_dialog(3, "when the user restarted the kernel")
        page.idle(60, "the restarted kernel")
        assert text_of(page.run(3)) == "False\n"

        for _ in range(2):  # each reconnect lands on the other replica
            before = proxy.channels()
            page.command("notebook:reconnect-to-kernel")
            browser.wait(lambda: len(proxy.channels()) > len(before), 20,
                         "JupyterLab to open a new kernel WebSocket")
            assert proxy.channels()[len(before)] != before[-1]
            # connected again; JupyterLab shows the status "unknown" until a cell runs (it
            # ignores the status messages of its own kernel_info_request after a reconnect)
            browser.wait(lambda: page.state()["kernel"]["connection"] == "connected", 30,
                         "JupyterLab to reconnect")
            cell = page.run(0)
            assert text_of(cell) == "out 42\n", cell
            assert page.state()["kernel"]["id"] == kid
        assert set(proxy.channels()) == {fresh_stack.port, second}, proxy.routed
        page.no_dialog(0, "behind two gateways")

        page.shut_down()
        assert not kernel_errors(browser.errors), browser.errors
    finally:
        lab.stop()
        proxy.stop()
