"""spark-submit --master yarn --deploy-mode cluster for one kernel, against literal argv and
properties; no Spark, no cluster (none can run here: docs/yarn.md)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from poolgate.workers.config import build
from poolgate.workers.errors import BadRequest, ConfigError, LaunchRejected
from poolgate.workers.launchers.spark_builders import (
    admit,
    build_spark_submit,
    client_options,
    properties_text,
    trimmed,
)
from poolgate.workers.launchers.yarn_builders import YarnOptions
from poolgate.workers.protocol import LaunchRequest

KID = "3f2a9c1e-8b7d-4e6f-a5b4-c3d2e1f0a9b8"
REPLY = {"POOLGATE_RESPONSE_ADDRESS": "10.0.0.5:40000", "POOLGATE_RESPONSE_KEY": "k"}
ARGV = ("python", "-m", "poolgate.spark_kernel", "--init-mode", "eager",
        "-f", "{connection_file}")
LAUNCHER = "/opt/poolgate/lib/kernel_launcher.py"
PROPS = "/tmp/pg-3f2a/spark.properties"


def request(extra: str | None = None, **resources: Any) -> LaunchRequest:
    env = {"KERNEL_USERNAME": "alice"}
    if extra is not None:
        env["KERNEL_EXTRA_SPARK_OPTS"] = extra
    return LaunchRequest(kernel_id=KID, pool="spark", spec_name="spark_python_yarn_cluster",
                         argv=ARGV, env=env, spec_env={"SPARK_HOME": "/opt/spark"},
                         user="alice", resources=dict(resources))


def options(**kw: Any) -> YarnOptions:
    return build(YarnOptions, {"rm_address": "http://rm1:8088", "submit": "spark-submit",
                               **kw}, "pools.spark.options")


def test_cluster_mode_argv_and_properties() -> None:
    sub = build_spark_submit(request(), options(python="/opt/conda/bin/python"), REPLY, "",
                             LAUNCHER, PROPS)
    assert sub.argv == [
        "spark-submit", "--master", "yarn", "--deploy-mode", "cluster",
        "--name", f"poolgate-{KID}", "--queue", "default", "--properties-file", PROPS,
        LAUNCHER, "--", "/opt/conda/bin/python", "-m", "poolgate.spark_kernel",
        "--init-mode", "eager", "-f", "{connection_file}"]
    assert sub.properties == {
        "spark.yarn.tags": f"poolgate,poolgate.kernel_id:{KID},poolgate.pool:spark",
        "spark.yarn.maxAppAttempts": "1",
        "spark.yarn.submit.waitAppCompletion": "false",
        "spark.driver.memory": "1024m",
        "spark.driver.cores": "1",
        "spark.yarn.appMasterEnv.SPARK_HOME": "/opt/spark",
        "spark.yarn.appMasterEnv.KERNEL_USERNAME": "alice",
        "spark.yarn.appMasterEnv.KERNEL_ID": KID,
        "spark.yarn.appMasterEnv.POOLGATE_RESPONSE_ADDRESS": "10.0.0.5:40000",
        "spark.yarn.appMasterEnv.POOLGATE_RESPONSE_KEY": "k"}
    assert "k" not in sub.argv  # the reply key is in the properties file only


def test_client_options_come_first_quoted_as_given_and_the_pool_has_the_last_word() -> None:
    extra = "--conf 'spark.app.note=a b; rm -rf /' --executor-memory 2g --num-executors 3"
    sub = build_spark_submit(
        request(extra, memory=3 * 2**30, cpus=2),
        options(queue="science", auth="simple", impersonation=True,
                spark_submit="/opt/spark/bin/spark-submit --verbose",
                spark_conf={"spark.yarn.archive": "hdfs:///spark/jars.zip"}),
        REPLY, "alice", LAUNCHER, PROPS)
    assert sub.argv == [
        "/opt/spark/bin/spark-submit", "--verbose",
        "--conf", "spark.app.note=a b; rm -rf /", "--executor-memory", "2g",
        "--num-executors", "3",
        "--master", "yarn", "--deploy-mode", "cluster", "--name", f"poolgate-{KID}",
        "--queue", "science", "--properties-file", PROPS, "--proxy-user", "alice",
        LAUNCHER, "--", "python3", "-m", "poolgate.spark_kernel", "--init-mode", "eager",
        "-f", "{connection_file}"]
    assert sub.properties["spark.yarn.archive"] == "hdfs:///spark/jars.zip"
    assert (sub.properties["spark.driver.memory"], sub.properties["spark.driver.cores"]) == \
        ("3072m", "2")


@pytest.mark.parametrize("extra, why", [
    ("--queue prod", "--queue is not an option a client may set"),
    ("--master local[4]", "--master is not an option a client may set"),
    ("--proxy-user root", "--proxy-user is not an option a client may set"),
    ("--conf spark.yarn.queue=prod", "a key the pool does not set"),
    ("--conf spark.yarn.appMasterEnv.POOLGATE_RESPONSE_ADDRESS=evil:1", "a key the pool"),
    ("--conf spark.kerberos.keytab=/etc/x", "a key the pool does not set"),
    ("--conf novalue", "expected key=value"),
    ("--driver-memory", "expected option value pairs"),
    ("--conf 'unbalanced", "No closing quotation"),
])
def test_client_options_that_would_override_the_pool_are_refused(extra: str, why: str) -> None:
    with pytest.raises(BadRequest, match="KERNEL_EXTRA_SPARK_OPTS") as err:
        client_options(extra)
    assert why in err.value.message


def test_properties_file_escapes_what_java_properties_would_read_otherwise() -> None:
    text = properties_text({"spark.yarn.appMasterEnv.NOTE": " a=b:c#d\\e\nf",
                            "odd key": "é"})
    assert text == ("spark.yarn.appMasterEnv.NOTE=\\ a\\=b\\:c\\#d\\\\e\\nf\n"
                    "odd\\ key=\\u00e9\n")


def test_spark_reads_the_properties_file_as_written(tmp_path: Path) -> None:
    """pyspark's own spark-submit (local mode: no cluster needed) reads the file back."""
    import pyspark

    if shutil.which("java") is None:
        pytest.fail("java is not installed; .ci/run installs default-jre-headless")
    values = {"spark.yarn.appMasterEnv.NOTE": "a=b:c#d\\e\nf 'q' \"dq\" $HOME; x ",
              "spark.poolgate.u": "é ü"}
    (tmp_path / "p.properties").write_text(properties_text(values))
    (tmp_path / "show.py").write_text(
        "import json\nfrom pyspark import SparkContext\nsc = SparkContext.getOrCreate()\n"
        f"print('PROPS' + json.dumps({{k: sc.getConf().get(k) for k in {list(values)!r}}}))\n"
        "sc.stop()\n")
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    done = subprocess.run([str(spark_submit), "--master", "local[1]", "--conf",
                           "spark.ui.enabled=false", "--properties-file",
                           str(tmp_path / "p.properties"), str(tmp_path / "show.py")],
                          capture_output=True, text=True, timeout=300)
    line = [x for x in done.stdout.splitlines() if x.startswith("PROPS")]
    assert line, done.stderr[-3000:]
    assert json.loads(line[0][5:]) == {k: v.strip() for k, v in values.items()}


def test_submit_kind_is_checked_at_load() -> None:
    with pytest.raises(ConfigError, match="submit: expected one of rest, spark-submit"):
        options(submit="spark")


@pytest.mark.parametrize("value,cut", [("a b", False), ("", False), (" a", True), ("a\t", True),
                                       ("\x01a", True), ("a\u00a0", False)])
def test_trimmed_is_what_javas_trim_takes(value: str, cut: bool) -> None:
    """Java's String.trim strips U+0000..U+0020 at the ends and nothing else (not U+00A0)."""
    assert trimmed(value) is cut


def test_a_clients_value_spark_would_trim_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="env.KERNEL_NOTE: .*Spark strips"):
        admit({"KERNEL_USERNAME": "alice", "KERNEL_NOTE": "padded "})
    with pytest.raises(BadRequest, match="KERNEL_EXTRA_SPARK_OPTS"):
        admit({"KERNEL_EXTRA_SPARK_OPTS": "--master yarn"})
    admit({"KERNEL_NOTE": "inner  spaces", "KERNEL_EXTRA_SPARK_OPTS": " --driver-memory 1g "})
    sub = build_spark_submit(request(" --driver-memory 1g "), options(), REPLY, "alice",
                             LAUNCHER, PROPS)  # the options' own spaces are noise: trimmed
    assert sub.properties["spark.yarn.appMasterEnv.KERNEL_EXTRA_SPARK_OPTS"] == \
        "--driver-memory 1g"


@pytest.mark.parametrize("where", ["spark_conf", "env"])
def test_an_operators_value_spark_would_trim_fails_the_launch_by_name(where: str) -> None:
    key = "spark.poolgate.note" if where == "spark_conf" else "NOTE"
    with pytest.raises(LaunchRejected, match=f"whitespace of .*{key}"):
        build_spark_submit(request(), options(**{where: {key: "x "}}), REPLY, "alice",
                           LAUNCHER, PROPS)
