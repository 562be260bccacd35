"""The HTTP face of tests/k8s_api.py's FakeKubernetes: core/v1 routes, JSON bodies, Status errors,
and watches as chunked streams of JSON lines (as ``kubectl get --watch -o json`` reads them)."""
from __future__ import annotations

import json
import queue
import re
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

if TYPE_CHECKING:
    from tests.k8s_api import FakeKubernetes

ROUTE = re.compile(r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/(?P<kind>pods|secrets|events|"
                   r"namespaces)(?:/(?P<name>[^/]+))?(?P<log>/log)?$|"
                   r"^/apis/networking\.k8s\.io/v1(?:/namespaces/(?P<nns>[^/]+))?/"
                   r"(?P<nkind>networkpolicies)(?:/(?P<nname>[^/]+))?$")
NAMESPACE = re.compile(r"^/api/v1/namespaces(?:/(?P<name>[^/]+))?$")


def make_handler(api: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    from tests.k8s_api import KINDS, VERSIONS, ApiError, selected, status, typed

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            api.requests.append(f"{self.command} {self.path}")

        def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                out = json.loads(raw) if raw else {}
            except ValueError:
                raise ApiError(400, "BadRequest", "the body is not JSON") from None
            return out if isinstance(out, dict) else {}

        def _route(self) -> tuple[str, str, str, bool, dict[str, str]]:
            url = urlparse(self.path)
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            m = NAMESPACE.match(url.path)
            if m:
                return "namespaces", "", m["name"] or "", False, q
            m = ROUTE.match(url.path)
            if not m or m["kind"] == "namespaces":
                raise ApiError(404, "NotFound", "the server could not find the requested "
                               "resource")
            if m["nkind"]:
                return m["nkind"], m["nns"] or "", m["nname"] or "", False, q
            return m["kind"], m["ns"] or "", m["name"] or "", bool(m["log"]), q

        def _handle(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                self._body()
                self._send(401, status(401, "Unauthorized", "Unauthorized"))
                return
            try:
                kind, ns, name, log, q = self._route()
                if self.command == "GET" and log:
                    tail = int(q["tailLines"]) if "tailLines" in q else None
                    self._send(200, api.logs(ns, name, tail), "text/plain")
                elif self.command == "GET" and name:
                    with api.lock:
                        obj = api._get(kind, ns, name)
                        self._send(200, typed(kind, obj))
                elif self.command == "GET" and q.get("watch") in ("true", "1"):
                    self._watch(kind, ns, q)
                elif self.command == "GET":
                    with api.lock:
                        items = [o for (k, n, _), o in api.objects.items() if k == kind and
                                 (not ns or n == ns) and
                                 selected(o, q.get("labelSelector", ""),
                                          q.get("fieldSelector", ""))]
                        self._send(200, {"kind": KINDS[kind] + "List", "apiVersion":
                                         VERSIONS.get(kind, "v1"),
                                         "metadata": {"resourceVersion": str(api.rv)},
                                         "items": items})
                elif self.command == "POST" and not name:
                    obj = api.create(kind, ns, self._body())
                    self._send(201, typed(kind, obj))
                elif self.command == "PATCH" and name:
                    ctype = self.headers.get("Content-Type", "")
                    body = self._body()
                    if ctype != "application/merge-patch+json":
                        raise ApiError(415, "UnsupportedMediaType", f"the body of the request "
                                       f"was in an unknown format: {ctype} (this fake API "
                                       "server takes application/merge-patch+json)")
                    obj = api.patch(kind, ns, name, body)
                    self._send(200, typed(kind, obj))
                elif self.command == "DELETE" and name:
                    body = self._body()
                    grace = q.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
                    out = api.delete(kind, ns, name, None if grace is None else int(grace),
                                     body.get("preconditions"))
                    self._send(200, out if out.get("kind") == "Status" else
                               typed(kind, out))
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{self.command} is not supported")
            except ApiError as exc:
                self._send(exc.body["code"], exc.body)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        def _chunk(self, event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _watch(self, kind: str, ns: str, q: dict[str, str]) -> None:
            labels, fields = q.get("labelSelector", ""), q.get("fieldSelector", "")
            since = q.get("resourceVersion", "")
            events: queue.Queue[Any] = queue.Queue()
            with api.lock:  # replay and register at once: no event falls in between
                if since not in ("", "0") and int(since) < api.floor:
                    first: list[Any] = [{"type": "ERROR", "object": status(
                        410, "Expired", f"too old resource version: {since} ({api.rv})")}]
                elif since in ("", "0"):
                    first = [{"type": "ADDED", "object": typed(kind, o)}
                             for (k, n, _), o in api.objects.items()
                             if k == kind and (not ns or n == ns) and selected(o, labels, fields)]
                else:
                    first = [{"type": t, "object": o} for rv, t, o in api.history
                             if rv > int(since) and o["kind"] == KINDS[kind] and
                             (not ns or o["metadata"].get("namespace") == ns) and
                             selected(o, labels, fields)]
                if not first or first[0]["type"] != "ERROR":
                    api.watches.append((events, kind, ns, labels, fields))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + float(q.get("timeoutSeconds") or 1800)
            bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
            try:
                for event in first:
                    self._chunk(event)
                while first[:1] == [] or first[0]["type"] != "ERROR":
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        event = events.get(timeout=min(left, 1.0))
                    except queue.Empty:
                        with api.lock:  # every event up to this version was sent
                            version = str(api.rv) if events.empty() else ""
                        if bookmarks and version:
                            self._chunk({"type": "BOOKMARK", "object": {
                                "kind": KINDS[kind], "apiVersion": VERSIONS.get(kind, "v1"),
                                "metadata": {"resourceVersion": version}}})
                        continue
                    if event is None:
                        break
                    self._chunk(event)
                    if event["type"] == "ERROR":
                        break
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
            finally:
                with api.lock:
                    api.watches[:] = [w for w in api.watches if w[0] is not events]
            self.close_connection = True

    return Handler
