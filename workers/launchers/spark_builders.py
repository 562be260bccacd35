"""yarn pools with ``submit: spark-submit``: the spark-submit command of one kernel, pure.

Enterprise Gateway runs its YARN Spark kernels as ``spark-submit --master yarn --deploy-mode
cluster``: Spark's own ApplicationMaster registers with the RM and runs the driver, which here
is the kernel launcher (its one file, ``poolgate/kernel_launcher.py``, is the primary resource
spark-submit uploads) wrapping the kernelspec's argv; the kernel, a child of the driver, reaches
the driver's JVM through the ``PYSPARK_GATEWAY_*`` variables it inherits, so
``poolgate.spark_kernel`` finds its SparkSession there. :func:`build_spark_submit` returns the
argv and the properties spark-submit reads from ``--properties-file``: the container's
environment (the reply key among it) goes there, in a file only the worker reads, and not on a
command line every user of the worker's host can list.

Rule: the pool decides where and as whom (master, deploy mode, queue, proxy user, tags, one
attempt, environment); ``KERNEL_EXTRA_SPARK_OPTS`` may add sizing, dependencies and
``--conf`` of other keys, and naming anything the pool decides is a BadRequest.

Spark trims every value it reads from a properties file (Java's ``String.trim``: each
character up to U+0020 at either end), so a value with such characters at an end would reach
the kernel changed. No other way of passing the container's environment keeps it off the
worker's command line, so such a value is refused: a client's (a ``KERNEL_*`` env value) with
a 400 at the gateway (:func:`admit`, before anything is queued), the pool's or kernelspec's
with a LaunchRejected that names it.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BadRequest, LaunchRejected
from ..protocol import LaunchRequest
from .docker_builders import BARE_PYTHON, resource_name
from .yarn_builders import YarnOptions, build_env, build_tags, resources

#: spark-submit options a client may pass (each takes one value)
CLIENT_OPTIONS = frozenset({
    "--conf", "--driver-memory", "--driver-cores", "--executor-memory", "--executor-cores",
    "--num-executors", "--jars", "--packages", "--exclude-packages", "--repositories",
    "--py-files", "--files", "--archives"})
SPARK_OPTS = "KERNEL_EXTRA_SPARK_OPTS"
#: configuration keys (and prefixes) only the pool sets
POOL_KEYS = ("spark.master", "spark.submit.deployMode", "spark.yarn.queue", "spark.yarn.tags",
             "spark.yarn.maxAppAttempts", "spark.yarn.submit.waitAppCompletion",
             "spark.yarn.appMasterEnv.", "spark.executorEnv.", "spark.kerberos.",
             "spark.yarn.principal", "spark.yarn.keytab", "spark.app.name",
             "spark.yarn.am.", "spark.driver.extraJavaOptions", "spark.pyspark.")


@dataclass(frozen=True)
class SparkSubmit:
    """What the worker runs: ``argv``, after writing ``properties`` to ``properties_file``."""

    argv: list[str]
    properties: dict[str, str]
    properties_file: str


def client_options(raw: str) -> list[str]:
    """``KERNEL_EXTRA_SPARK_OPTS`` as words, checked against what a client may set."""
    try:
        words = shlex.split(raw)
    except ValueError as exc:
        raise BadRequest(f"env.KERNEL_EXTRA_SPARK_OPTS: {exc}") from None
    if len(words) % 2:
        raise BadRequest("env.KERNEL_EXTRA_SPARK_OPTS: expected option value pairs, got "
                         f"{raw!r}")
    for opt, value in zip(words[::2], words[1::2]):
        if opt not in CLIENT_OPTIONS:
            raise BadRequest(f"env.KERNEL_EXTRA_SPARK_OPTS: {opt} is not an option a client "
                             f"may set here (allowed: {', '.join(sorted(CLIENT_OPTIONS))})")
        key = value.split("=", 1)[0]
        if opt == "--conf" and ("=" not in value or key.startswith(POOL_KEYS)):
            raise BadRequest(f"env.KERNEL_EXTRA_SPARK_OPTS: --conf {value!r}: expected "
                             "key=value with a key the pool does not set")
    return words


def trimmed(value: str) -> bool:
    """Whether Spark would change ``value`` reading it from a properties file."""
    return bool(value) and (value[0] <= " " or value[-1] <= " ")


def admit(env: Mapping[str, str]) -> None:
    """The gateway's check of a start request's env for a ``submit: spark-submit`` pool:
    a BadRequest for client options it may not pass and for values Spark would trim."""
    client_options(env.get("KERNEL_EXTRA_SPARK_OPTS", ""))
    for key, value in env.items():
        if trimmed(value) and key != SPARK_OPTS:
            raise BadRequest(f"env.{key}: the value starts or ends with whitespace (or a "
                             "control character), which Spark strips from the properties file "
                             "that carries the kernel's environment here: remove it")


def build_properties(req: LaunchRequest, options: YarnOptions, reply_env: Mapping[str, str],
                     user: str) -> dict[str, str]:
    """The pool's spark_conf, then what poolgate decides: the application's identity,
    resources, one attempt, and the driver container's environment."""
    asked = resources(req, options)
    props = {**dict(options.spark_conf),
             "spark.yarn.tags": ",".join(build_tags(req)),
             "spark.yarn.maxAppAttempts": str(options.max_app_attempts),
             "spark.yarn.submit.waitAppCompletion": "false",
             "spark.driver.memory": f"{asked['memory']}m",
             "spark.driver.cores": str(asked["vCores"])}
    for key, value in build_env(req, options, reply_env, user).items():
        # the options' words are what counts, and spark-submit has them: space around is noise
        props[f"spark.yarn.appMasterEnv.{key}"] = value.strip() if key == SPARK_OPTS else value
    bad = sorted(k for k, v in props.items() if trimmed(v))
    if bad:  # the client's own values were refused at the gateway: these are the operator's
        raise LaunchRejected(f"pool {req.pool!r}: Spark would strip the leading or trailing "
                             f"whitespace of {', '.join(bad)} (from the pool's spark_conf or env, "
                             "or the kernelspec's env); remove it there")
    return props


def build_spark_submit(req: LaunchRequest, options: YarnOptions, reply_env: Mapping[str, str],
                       user: str, launcher_file: str, properties_file: str) -> SparkSubmit:
    """spark-submit in YARN cluster mode for one kernel: the client's extra options first, so
    that the pool's, which follow, win; then the kernel launcher file and the spec's argv."""
    argv = [a.replace("{resource_dir}", "") for a in req.argv]
    if argv and BARE_PYTHON.match(argv[0]):
        argv[0] = options.python
    extra = client_options(req.env.get("KERNEL_EXTRA_SPARK_OPTS", ""))
    words = [*shlex.split(options.spark_submit), *extra,
             "--master", "yarn", "--deploy-mode", "cluster",
             "--name", resource_name(req.kernel_id), "--queue", options.queue,
             "--properties-file", properties_file]
    if options.impersonation and user:
        words += ["--proxy-user", user]
    words += [launcher_file, "--", *argv]
    return SparkSubmit(words, build_properties(req, options, reply_env, user), properties_file)


def properties_text(props: Mapping[str, str]) -> str:
    """``props`` as a Java properties file (what spark-submit's --properties-file reads).

    Spark trims each value it reads from the file, so a value's leading and trailing
    whitespace is lost (checked against pyspark's spark-submit in the tests); all else,
    newlines, quotes, ``$``, ``=``, ``:``, ``#`` and non-ASCII included, arrives as written."""
    def escape(text: str, key: bool) -> str:
        out = []
        for i, ch in enumerate(text):
            if ch == "\\":
                out.append("\\\\")
            elif ch in "\n\r\t\f":
                out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}[ch])
            elif ch in "=:#!" or (ch == " " and (key or i == 0)):
                out.append("\\" + ch)
            elif ord(ch) > 126:
                out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else ch)
            else:
                out.append(ch)
        return "".join(out)

    return "".join(f"{escape(k, True)}={escape(v, False)}\n" for k, v in props.items())
