"""FakeResourceManager: a small, API-faithful YARN ResourceManager for the yarn pool's tests.

What it serves, as Hadoop's RM does (``/ws/v1/cluster``, JSON only):

- ``POST apps/new-application`` → ``{"application-id", "maximum-resource-capability"}``
- ``POST apps`` (the submission body) → 202 with a ``Location``; a bad body is a 400
  ``BadRequestException`` in a ``RemoteException``; an unknown queue is accepted and then
  FAILS with the RM's diagnostics, as the CapacityScheduler does
- ``GET apps[?applicationTags=&states=]``, ``GET apps/<id>``, ``GET apps/<id>/state``
  (an unknown id is a 404 ``NotFoundException``)
- ``PUT apps/<id>/state {"state": "KILLED"}`` → 202 while the kill is under way, 200 once
  the application is in a final state; any other target state is a 400
- ``GET info`` → ``clusterInfo`` with ``haState``
- a standby RM answers every ``apps`` call with ``307 Temporary Redirect`` to the active RM
  (Hadoop's RMWebAppFilter), but ``info`` itself

Applications go NEW → NEW_SAVING → SUBMITTED → ACCEPTED; an ACCEPTED application whose queue
has room gets its AM container: the command is REALLY run, with bash, as a local process in
its own session, with the container's environment (the submitted one plus what a NodeManager
sets: CONTAINER_ID, LOG_DIRS, LOCAL_DIRS, PWD, USER, HADOOP_TOKEN_FILE_LOCATION, and PATH/LANG
from its whitelist) and ``<LOG_DIR>`` replaced by the container's log folder.

The AM side is real Hadoop: the container's credentials file holds an AMRMToken minted by
Hadoop's own ApplicationMasterProtocol server (tests/yarn_am_service.py, one JVM per test
process), whose service is that server's address, and the RM learns from it what its AMs do,
as the real RM's ApplicationMasterService does. So the application stays ACCEPTED ("waiting for
AM container to Register with RM") until its AM registers over Hadoop RPC, is RUNNING after,
and ends FINISHED with the final status the AM unregisters with (finishApplicationMaster). An
AM that exits without unregistering FAILS the application with its exit code; one that has not
heartbeated (registered or allocated) for ``am_expiry`` seconds since its container started is
expired (``yarn.am.liveness-monitor.expiry-interval-ms``): the application FAILS with the RM's
"timed out" diagnostics and the container is killed, as :meth:`expire` does at once. A kill
sends SIGTERM to the container's process group, then SIGKILL after ``kill_delay``; an attempt
the RM ended is revoked, so its token no longer authenticates. A queue of capacity 0 keeps its
applications ACCEPTED, with the CapacityScheduler's diagnostics.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.yarn_am_service import Event, HadoopAMService, shared_service

APPS = "/ws/v1/cluster/apps"
FINAL = ("FINISHED", "FAILED", "KILLED")
MAX = {"memory": 8192, "vCores": 4}
NEW_ID = re.compile(r"^application_\d+_\d{4,}$")
ALWAYS_ENV = ("PATH", "LANG", "HOME", "PYTHONPATH", "VIRTUAL_ENV")  # the NodeManager's whitelist
_cluster_ids = itertools.count()


@dataclass
class App:
    """One application, as the RM keeps it."""

    id: str
    name: str
    user: str
    queue: str
    app_type: str
    tags: list[str]
    command: str
    env: dict[str, str]
    resource: dict[str, int]
    state: str = "NEW"
    final_status: str = "UNDEFINED"
    diagnostics: str = ""
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    log_dir: str = ""
    history: list[str] = field(default_factory=lambda: ["NEW"])
    last_beat: float = 0.0        # monotonic: container start, then each register/allocate
    before_kill: str = ""         # the state a kill under way is reported as

    @property
    def attempt(self) -> str:
        return self.id.replace("application", "appattempt") + "_000001"

    def move(self, state: str) -> None:
        self.state = state
        self.history.append(state)

    def report(self, rm_url: str) -> dict[str, Any]:
        """The ``app`` object of ``GET apps/<id>`` (the fields clients read)."""
        running = self.state == "RUNNING"
        return {
            "id": self.id, "user": self.user, "name": self.name, "queue": self.queue,
            "state": self.state, "finalStatus": self.final_status,
            "progress": 0.0 if self.state not in FINAL else 100.0,
            "trackingUI": "UNASSIGNED" if not running else "ApplicationMaster",
            "trackingUrl": f"{rm_url}/proxy/{self.id}/", "diagnostics": self.diagnostics,
            "clusterId": 1700000000000, "applicationType": self.app_type,
            "applicationTags": ",".join(self.tags), "priority": 0,
            "startedTime": int(self.started * 1000),
            "finishedTime": int(self.finished * 1000), "elapsedTime": int(
                ((self.finished or time.time()) - self.started) * 1000),
            "amContainerLogs": f"file://{self.log_dir}" if self.log_dir else "",
            "amHostHttpAddress": "127.0.0.1:8042" if self.proc else "",
            "allocatedMB": self.resource["memory"] if running else -1,
            "allocatedVCores": self.resource["vCores"] if running else -1,
            "runningContainers": 1 if running else -1,
        }


class FakeResourceManager:
    """An RM on 127.0.0.1 (``url``); ``queues`` maps names to how many AMs may run at once."""

    def __init__(self, workdir: Path, queues: dict[str, int] | None = None,
                 active: FakeResourceManager | None = None, kill_delay: float = 0.25,
                 require_user: bool = False, am_expiry: float = 600.0,
                 am_service: HadoopAMService | None = None) -> None:
        self.workdir = workdir
        self.queues = queues if queues is not None else {"default": 16}
        self.active = active          # set: this RM is a standby that redirects there
        self.kill_delay = kill_delay
        self.require_user = require_user
        self.am_expiry = am_expiry
        self.forge_tokens = False     # True: AMRMTokens with a password from another key
        # A standby launches nothing, so it needs no AM service.
        self.am = am_service if am_service is not None or active is not None else \
            shared_service()
        self._am_events: collections.deque[Event] = collections.deque()
        self.apps: dict[str, App] = {}
        self.issued: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path?query) as received
        self.lock = threading.RLock()
        # Unique per RM of this process: the AM service is shared, and routes by attempt id.
        self.cluster_ts = int(time.time() * 1000) + next(_cluster_ids)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeResourceManager:
        if self.am is not None:
            self.am.listeners.append(self._am_events.append)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-rm").start()
        threading.Thread(target=self._schedule, daemon=True, name="fake-rm-scheduler").start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self.am is not None and self._am_events.append in self.am.listeners:
            self.am.listeners.remove(self._am_events.append)
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for app in self.apps.values():
                self._signal(app, signal.SIGKILL)

    def live(self) -> list[App]:
        """Applications not in a final state, or whose container still runs."""
        with self.lock:
            return [a for a in self.apps.values() if a.state not in FINAL
                    or (a.proc is not None and a.proc.poll() is None)]

    # -- the scheduler: states, containers, kills ----------------------------------------------

    def _schedule(self) -> None:
        while not self._stop.wait(0.05):
            with self.lock:
                while self._am_events:
                    self._on_am(self._am_events.popleft())
                for app in list(self.apps.values()):
                    self._step(app)

    def _on_am(self, event: Event) -> None:
        """What the ApplicationMasterService told: a registration, a heartbeat, an unregister."""
        app_id = "application_" + str(event.get("attempt", "")).removeprefix(
            "appattempt_").rsplit("_", 1)[0]
        app = self.apps.get(app_id)
        if app is None or app.state in FINAL or app.state == "KILLING":
            return
        if event["event"] in ("register", "allocate"):
            app.last_beat = max(app.last_beat, float(event["t"]))
        if event["event"] == "register" and app.state == "ACCEPTED":
            app.move("RUNNING")
            app.diagnostics = ""
        elif event["event"] == "finish":
            self._end(app, "FINISHED", str(event["final_status"]),
                      str(event.get("diagnostics") or ""))

    def _step(self, app: App) -> None:
        nxt = {"NEW": "NEW_SAVING", "NEW_SAVING": "SUBMITTED", "SUBMITTED": "ACCEPTED"}
        if app.state in nxt:
            app.move(nxt[app.state])
            if app.state == "ACCEPTED" and app.queue not in self.queues:
                self._end(app, "FAILED", "FAILED", f"Application {app.id} submitted by user "
                          f"{app.user} to unknown queue: {app.queue}")
            return
        if app.state == "ACCEPTED" and app.proc is None:
            running = sum(1 for a in self.apps.values() if a.queue == app.queue
                          and a.proc is not None and a.state not in FINAL)
            if running < self.queues[app.queue]:
                self._launch(app)
            else:
                app.diagnostics = (
                    "[%s] Application is added to the scheduler and is not yet activated. "
                    "Queue's AM resource limit exceeded.  Details : AM Partition = "
                    "<DEFAULT_PARTITION>; AM Resource Request = <memory:%d, vCores:%d>; Queue "
                    "Resource Limit for AM = <memory:0, vCores:0>; Queue AM Resource Usage = "
                    "<memory:0, vCores:0>; " % (time.strftime("%a %b %d %H:%M:%S %z %Y"),
                                                app.resource["memory"], app.resource["vCores"]))
            return
        if app.state in ("ACCEPTED", "RUNNING", "KILLING") and app.proc is not None:
            code = app.proc.poll()
            if code is None:
                if app.state != "KILLING" and time.monotonic() - app.last_beat > self.am_expiry:
                    self.expire(app.id)
                return
            if app.state == "KILLING":
                self._end(app, "KILLED", "KILLED", "Application killed by user.")
            else:
                self._end(app, "FAILED", "FAILED", (
                    f"Application {app.id} failed 1 times (global limit =2; local limit is =1) "
                    f"due to AM Container for {app.id.replace('application', 'appattempt')}"
                    f"_000001 exited with  exitCode: {code}\nFailing this attempt.Diagnostics: "
                    f"[{time.strftime('%Y-%m-%d %H:%M:%S')}]Exception from container-launch.\n"
                    f"For more detailed output, check the application tracking page: "
                    f"{self.url}/cluster/app/{app.id} Then click on links to logs of each "
                    f"attempt.\n. Failing the application."))

    def _launch(self, app: App) -> None:
        cid = f"container_{app.id[len('application_'):]}_01_000001"
        log_dir = self.workdir / "userlogs" / app.id / cid
        work = self.workdir / "appcache" / app.id / cid
        log_dir.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in ALWAYS_ENV if k in os.environ}
        nm = {"CONTAINER_ID": cid, "LOG_DIRS": str(log_dir), "PWD": str(work),
              "LOCAL_DIRS": str(work.parent), "HADOOP_USER_NAME": app.user,
              "USER": app.user, "LOGNAME": app.user, "NM_HOST": "127.0.0.1",
              "APPLICATION_WEB_PROXY_BASE": f"/proxy/{app.id}"}
        env.update(nm)
        command = app.command.replace("<LOG_DIR>", str(log_dir))
        command = re.sub(r"\{\{(\w+)\}\}", lambda m: env.get(m.group(1), ""), command)
        # As a NodeManager's launch_container.sh: the submitted environment as
        # export NAME="value" lines ({{NAME}} becoming $NAME), then the command, run by bash.
        exports = "".join('export %s="%s"\n' % (k, re.sub(r"\{\{(\w+)\}\}", r"$\1", v))
                          for k, v in app.env.items() if k not in nm)
        if self.am is not None:  # the NodeManager localizes the container's tokens
            tokens = work / "container_tokens"
            self.am.mint(app.attempt, tokens, bad=self.forge_tokens)
            env["HADOOP_TOKEN_FILE_LOCATION"] = str(tokens)
        app.log_dir = str(log_dir)
        app.proc = subprocess.Popen(["bash", "-c", exports + command], env=env, cwd=work,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        app.last_beat = time.monotonic()  # the liveness monitor starts at the AM's launch
        app.diagnostics = ("[%s] AM container is launched, waiting for AM container to "
                           "Register with RM" % time.strftime("%a %b %d %H:%M:%S %z %Y"))

    def _end(self, app: App, state: str, final: str, diagnostics: str) -> None:
        app.move(state)
        app.final_status, app.diagnostics, app.finished = final, diagnostics, time.time()
        if self.am is not None and app.proc is not None and state != "FINISHED":
            self.am.revoke(app.attempt)  # the RM forgets an attempt it ended

    def _signal(self, app: App, signum: int) -> None:
        """Signal the container's process group, as a NodeManager does, even when its first
        process (bash) has gone: what it started may live on (a stopped AM does)."""
        if app.proc is not None:
            # Linux gives no new process a pid that still names a live process group.
            try:
                os.killpg(app.proc.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, app: App) -> None:
        """What ``PUT state KILLED`` does: end the AM container, then the application."""
        if app.state in FINAL or app.state == "KILLING":
            return
        if app.proc is None or app.proc.poll() is not None:
            self._end(app, "KILLED", "KILLED", "Application killed by user.")
            return
        app.before_kill, app.state = app.state, "KILLING"  # reported as before; see _state_of
        self._signal(app, signal.SIGTERM)

        def hard() -> None:
            time.sleep(self.kill_delay)
            with self.lock:
                self._signal(app, signal.SIGKILL)
        threading.Thread(target=hard, daemon=True).start()

    def expire(self, app_id: str) -> None:
        """What the RM does to an AM that stopped heartbeating (``yarn.am.liveness-monitor.
        expiry-interval-ms``): fail the application and kill its container, SIGTERM then
        SIGKILL as a NodeManager does."""
        with self.lock:
            app = self.apps[app_id]
            self._signal(app, signal.SIGTERM)
            threading.Timer(self.kill_delay, self._signal, (app, signal.SIGKILL)).start()
            attempt = app.id.replace("application", "appattempt") + "_000001"
            self._end(app, "FAILED", "FAILED", (
                f"Application {app.id} failed 1 times (global limit =2; local limit is =1) due "
                f"to ApplicationMaster for attempt {attempt} timed out. Failing the "
                "application."))

    # -- HTTP ---------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                rm.requests.append((method, self.path))
                status, body, headers = rm.answer(method, self.path, raw)
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(
                    body, bytes) else "text/plain")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    @staticmethod
    def error(status: int, exception: str, message: str) -> tuple[int, Any, dict[str, str]]:
        pkg = "org.apache.hadoop.yarn.webapp." if exception.endswith("Exception") and \
            exception in ("BadRequestException", "NotFoundException", "ForbiddenException") \
            else "org.apache.hadoop.security.authorize."
        return status, {"RemoteException": {"exception": exception, "message": message,
                                            "javaClassName": pkg + exception}}, {}

    def answer(self, method: str, target: str, raw: bytes) -> tuple[int, Any, dict[str, str]]:
        url = urlsplit(target)
        path, query = url.path.rstrip("/"), {k: v[-1] for k, v in parse_qs(url.query).items()}
        if path == "/ws/v1/cluster/info":
            return 200, {"clusterInfo": {"id": self.cluster_ts, "state": "STARTED",
                                         "haState": "STANDBY" if self.active else "ACTIVE"}}, {}
        if self.active is not None and path.startswith(APPS):
            where = self.active.url + target
            return 307, f"This is standby RM. The redirect url is: {where}".encode(), {
                "Location": where}
        if not path.startswith(APPS):
            return self.error(404, "NotFoundException", f"java.lang.Exception: no path {path}")
        user = query.get("doAs") or query.get("user.name") or ""
        if self.require_user and not query.get("user.name"):
            return self.error(401, "AuthenticationException", "Authentication required")
        with self.lock:
            return self._apps(method, path[len(APPS):].strip("/"), query, raw, user or "dr.who")

    def _apps(self, method: str, rest: str, query: dict[str, str], raw: bytes,
              user: str) -> tuple[int, Any, dict[str, str]]:
        parts = rest.split("/") if rest else []
        if method == "POST" and parts == ["new-application"]:
            app_id = f"application_{self.cluster_ts}_{len(self.issued) + 1:04d}"
            self.issued.add(app_id)
            return 200, {"application-id": app_id, "maximum-resource-capability": MAX}, {}
        if method == "POST" and not parts:
            return self._submit(raw, user)
        if method == "GET" and not parts:
            tags = {t for t in query.get("applicationTags", "").lower().split(",") if t}
            states = {s for s in query.get("states", "").upper().split(",") if s}
            found = [a.report(self.url) for a in self.apps.values()
                     if (not tags or tags & set(a.tags))
                     and (not states or self._state_of(a) in states)]
            return 200, {"apps": {"app": found} if found else None}, {}
        app = self.apps.get(parts[0]) if parts else None
        if app is None:
            return self.error(404, "NotFoundException",
                              f"java.lang.Exception: app with id: {parts[0] if parts else ''} "
                              "not found")
        if method == "GET" and len(parts) == 1:
            return 200, {"app": {**app.report(self.url), "state": self._state_of(app)}}, {}
        if len(parts) == 2 and parts[1] == "state":
            if method == "GET":
                return 200, {"state": self._state_of(app)}, {}
            if method == "PUT":
                try:
                    target = json.loads(raw or b"{}").get("state")
                except ValueError:
                    target = None
                if target != "KILLED":
                    return self.error(400, "BadRequestException",
                                      "Only 'KILLED' is allowed as a target state.")
                self.kill(app)
                state = self._state_of(app)
                return (200 if state in FINAL else 202), {"state": state}, {}
        return self.error(405, "WebApplicationException", f"{method} not allowed here")

    @staticmethod
    def _state_of(app: App) -> str:
        """What clients see: a kill under way shows the state before it."""
        return app.before_kill if app.state == "KILLING" else app.state

    def _submit(self, raw: bytes, user: str) -> tuple[int, Any, dict[str, str]]:
        try:
            body = json.loads(raw)
            app_id = str(body["application-id"])
            am = body["am-container-spec"]
            command = str(am["commands"]["command"])
            env = {str(e["key"]): str(e["value"])
                   for e in (am.get("environment") or {}).get("entry", [])}
            resource = {"memory": int(body["resource"]["memory"]),
                        "vCores": int(body["resource"]["vCores"])}
            tags = [str(t).lower() for t in (body.get("application-tags") or {}).get("tag", [])]
        except (ValueError, KeyError, TypeError) as exc:
            return self.error(400, "BadRequestException", f"javax.ws.rs.WebApplicationException"
                              f": bad submission: {exc!r}")
        if not NEW_ID.match(app_id) or app_id not in self.issued:
            return self.error(400, "BadRequestException", f"Invalid ApplicationId: {app_id}")
        if app_id in self.apps:
            return self.error(400, "BadRequestException", f"Application with id '{app_id}' "
                              "is already present! Cannot add a duplicate!")
        if any(len(t) > 100 for t in tags):
            return self.error(400, "BadRequestException", "Tag length should not exceed 100")
        if resource["memory"] > MAX["memory"] or resource["vCores"] > MAX["vCores"]:
            return self.error(400, "BadRequestException", "Invalid resource request, requested "
                              f"resource {resource} exceeds the maximum allocation {MAX}")
        self.apps[app_id] = App(
            id=app_id, name=str(body.get("application-name") or "N/A"), user=user,
            queue=str(body.get("queue") or "default"), app_type=str(
                body.get("application-type") or "YARN"), tags=tags, command=command, env=env,
            resource=resource)
        return 202, {}, {"Location": f"{self.url}{APPS}/{app_id}"}
