"""FakeSparkSubmit: a stand-in for ``spark-submit --master yarn --deploy-mode cluster``.

No YARN that spark-submit could reach (Hadoop RPC) runs here, so the yarn launcher's
``submit: spark-submit`` path is tested with this script in its place: it reads the options
poolgate passes (and only those: anything else is an error, as a wrong option would be), loads
the ``--properties-file`` as Java would, and submits what Spark's client would to
tests/yarn_rm.py's REST API (``FAKE_RM_URL``): an application with the properties' tags, queue
and one attempt, whose AM runs the primary resource (the kernel launcher file) with the
driver's environment (``spark.yarn.appMasterEnv.*``). Then it exits, as spark-submit does with
``spark.yarn.submit.waitAppCompletion=false``. What it does not do: start a JVM, register an
AM, or give the driver a SparkContext.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import urllib.request
from typing import Any

OPTIONS = ("--master", "--deploy-mode", "--name", "--queue", "--properties-file",
           "--proxy-user", "--conf", "--executor-memory", "--num-executors")


def java_properties(text: str) -> dict[str, str]:
    """The key=value lines of a properties file, unescaped as java.util.Properties does."""
    def unescape(s: str) -> str:
        table = {"n": "\n", "r": "\r", "t": "\t", "f": "\f"}
        return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", lambda m: chr(int(m[1][1:], 16))
                      if m[1][0] == "u" and len(m[1]) == 5 else table.get(m[1], m[1]), s)
    out = {}
    for line in text.splitlines():
        m = re.match(r"((?:\\.|[^=:\\])*)[=:](.*)$", line)
        if m and not line.startswith(("#", "!")):
            out[unescape(m[1])] = unescape(m[2])
    return out


def call(url: str, body: Any = None) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else b"",
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def main(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    while argv and argv[0].startswith("--") and argv[0] != "--":
        if argv[0] not in OPTIONS:
            print(f"Error: Unrecognized option: {argv[0]}", file=sys.stderr)
            return 1
        opts[argv[0]], argv = argv[1], argv[2:]
    if (opts.get("--master"), opts.get("--deploy-mode")) != ("yarn", "cluster"):
        print("Error: this stand-in only does --master yarn --deploy-mode cluster",
              file=sys.stderr)
        return 1
    with open(opts["--properties-file"]) as f:
        props = java_properties(f.read())
    primary, args = argv[0], argv[1:]
    rm = os.environ["FAKE_RM_URL"] + "/ws/v1/cluster/apps"
    app_id = call(rm + "/new-application")["application-id"]
    prefix = "spark.yarn.appMasterEnv."
    env = [{"key": k[len(prefix):], "value": v} for k, v in props.items()
           if k.startswith(prefix)]
    call(rm, {"application-id": app_id, "application-name": opts["--name"],
              "queue": opts["--queue"], "application-type": "SPARK",
              "application-tags": {"tag": props["spark.yarn.tags"].split(",")},
              "max-app-attempts": int(props["spark.yarn.maxAppAttempts"]),
              "resource": {"memory": int(props["spark.driver.memory"].rstrip("m")),
                           "vCores": int(props["spark.driver.cores"])},
              "am-container-spec": {"environment": {"entry": env}, "commands": {"command": (
                  f"{shlex.join([sys.executable, primary, *args])} "
                  "1><LOG_DIR>/stdout 2><LOG_DIR>/stderr")}}})
    print(f"INFO Client: Submitted application {app_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
