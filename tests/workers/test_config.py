"""queues.yaml loading: typed objects, and messages that name the path and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from poolgate.workers.config import load_config
from poolgate.workers.errors import ConfigError


def write(tmp_path: Path, data: dict, specs: dict | None = None) -> Path:
    if specs:
        folder = tmp_path / "specs"
        for name, spec in specs.items():
            (folder / name).mkdir(parents=True)
            (folder / name / "kernel.json").write_text(json.dumps(spec))
        data = {**data, "kernelspec_dirs": [str(folder)]}
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"pools": {"local": {"launcher": "local", "slots": 2}}}
ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def test_packaged_default_loads_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert "local" in cfg.pools and cfg.kernelspecs["python3"].pool == "local"
    assert cfg.broker_url == "redis://127.0.0.1:6379/0"
    assert cfg.source.endswith("queues.yaml")


def test_local_queues_yaml_wins_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {**BASE, "broker_url": "amqp://guest:guest@127.0.0.1:5672//"})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.pools["local"].slots == 2 and cfg.pools["local"].queue == "local"
    assert cfg.broker_url.startswith("amqp://")
    assert cfg.registry_url == "redis://127.0.0.1:6379/0"  # amqp cannot hold the registry
    cfg = load_config(None, environ={"POOLGATE_BROKER_URL": "redis://h:1/2"})
    assert cfg.broker_url == "redis://h:1/2" and cfg.registry_url == "redis://h:1/2"


@pytest.mark.parametrize("data,message", [
    ({"pools": {"local": {"launcher": "local", "slot": 2}}},
     "pools.local.slot: unknown key; did you mean 'slots'?"),
    ({"pools": {"local": {"launcher": "local", "slots": "one"}}},
     'pools.local.slots: expected an integer, got "one"'),
    ({"pools": {"local": {"launcher": "local", "slots": 0}}},
     "pools.local.slots: expected a number >= 1, got 0"),
    ({"pools": {"local": {"launcher": "locl"}}},
     "pools.local.launcher: unknown launcher 'locl'; did you mean 'local'?"),
    ({"pools": {"local": {"launcher": "local", "options": {"ipp": "x"}}}},
     "pools.local.options.ipp: unknown key; did you mean 'ip'?"),
    ({"pools": {"local": {"launcher": "local", "launch_timeout": -1}}},
     "pools.local.launch_timeout: expected a number > 0, got -1.0"),
    ({"pool": {}}, "pool: unknown key; did you mean 'pools'?"),
    ({"pools": {"a": {"launcher": "local", "queue": "q"}, "b": {"launcher": "local", "queue": "q"}}},
     "pools.b.queue: 'q' is already the queue of pool 'a'"),
    ({"pools": {"local": {"launcher": "local"}}, "default_pool": "gpu"}, "default_pool: no pool 'gpu'"),
    ({"pools": {"local": {"launcher": "local", "kernelspecs": ["nope"]}}},
     "pools.local.kernelspecs: no kernelspec 'nope'"),
    ({"pools": {"local": {"launcher": "local"}}, "reconcile_interval": 0},
     "reconcile_interval: expected a number > 0, got 0.0"),
    ({"pools": {"local": {"launcher": "local"}}, "reconcile_interval": "1m"},
     'reconcile_interval: expected a number, got "1m"'),
])
def test_bad_config_names_path_and_fix(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), environ={})
    assert message in str(info.value)


def test_routing_rules(tmp_path: Path) -> None:
    specs = {
        "by-meta": {"argv": ARGV, "metadata": {"poolgate": {"pool": "big"}}},
        "eg-yarn": {"argv": ARGV, "metadata": {"process_proxy": {"class_name":
                    "enterprise_gateway.services.processproxies.yarn.YarnClusterProcessProxy"}}},
        "eg-k8s": {"argv": ARGV, "metadata": {"process_proxy": {"class_name":
                   "enterprise_gateway.services.processproxies.k8s.KubernetesProcessProxy"}}},
        "custom": {"argv": ARGV, "metadata": {"process_proxy": {"class_name": "my.Proxy"}}},
        "plain": {"argv": ARGV},
    }
    data = {"pools": {"local": {"launcher": "local"}, "big": {"launcher": "local"}}, "default_pool": "local",
            "process_proxy_map": {"my.Proxy": "big",
                                  "enterprise_gateway.services.processproxies.k8s."
                                  "KubernetesProcessProxy": "big"}}
    cfg = load_config(write(tmp_path, data, specs), environ={})
    pools = {n: s.pool for n, s in cfg.kernelspecs.items()}
    assert pools["by-meta"] == "big" and pools["custom"] == "big" and pools["eg-k8s"] == "big"
    assert pools["plain"] == "local"
    assert cfg.kernelspecs["eg-yarn"].unserved  # no yarn pool: refused, never run on the default
    assert not any(cfg.kernelspecs[n].unserved for n in ("by-meta", "custom", "eg-k8s", "plain"))


EG = "enterprise_gateway.services.processproxies."


def test_process_proxies_route_to_their_launcher_or_are_refused(tmp_path: Path) -> None:
    proxies = {
        "yarn": EG + "yarn.YarnClusterProcessProxy",
        "k8s": EG + "k8s.KubernetesProcessProxy",
        "dist": EG + "distributed.DistributedProcessProxy",
        "conductor": EG + "conductor.ConductorClusterProcessProxy",
        "spark-op": EG + "spark_operator.SparkOperatorProcessProxy",
        "crd": EG + "crd.CustomResourceProcessProxy",
        "swarm": EG + "docker_swarm.DockerSwarmProcessProxy",
        "eg-local": EG + "processproxy.LocalProcessProxy",
        "unknown": "my.own.Proxy",
    }
    specs = {n: {"argv": ARGV, "metadata": {"process_proxy": {"class_name": c}}}
             for n, c in proxies.items()}
    specs["gp-yarn"] = {"argv": ARGV, "metadata": {"kernel_provisioner": {
        "provisioner_name": "yarn-provisioner"}}}
    specs["gp-k8s"] = {"argv": ARGV, "metadata": {"kernel_provisioner": {
        "provisioner_name": "kubernetes-provisioner"}}}
    data = {"pools": {"local": {"launcher": "local"}, "hadoop": {"launcher": "local"}},
            "default_pool": "local", "process_proxy_map": {"yarn-provisioner": "hadoop",
                                                          proxies["yarn"]: "hadoop"}}
    cfg = load_config(write(tmp_path, data, specs), environ={})
    ks = cfg.kernelspecs
    assert ks["yarn"].pool == "hadoop" and not ks["yarn"].unserved
    assert ks["gp-yarn"].pool == "hadoop" and not ks["gp-yarn"].unserved
    assert ks["eg-local"].pool == "local" and not ks["eg-local"].unserved  # any pool runs it
    for name in ("k8s", "dist", "conductor", "spark-op", "crd", "swarm", "unknown", "gp-k8s"):
        assert ks[name].unserved, name
    assert ks["k8s"].unserved == (
        f"kernelspec 'k8s' asks for process proxy {proxies['k8s']}, and no pool of this gateway "
        "serves it: add a pool with launcher 'kubernetes' to queues.yaml, or map the class to a pool in "
        "process_proxy_map")
    assert "add a pool for it to queues.yaml" in ks["unknown"].unserved
    assert "add a pool with launcher 'ssh'" in ks["dist"].unserved
    assert "kernel provisioner kubernetes-provisioner" in ks["gp-k8s"].unserved


def test_yarn_spec_refused_without_a_yarn_pool_is_no_default(tmp_path: Path) -> None:
    specs = {"eg-yarn": {"argv": ARGV, "metadata": {"process_proxy": {
        "class_name": EG + "yarn.YarnClusterProcessProxy"}}}}
    cfg = load_config(write(tmp_path, BASE, specs), environ={})
    dirs = {"kernelspec_dirs": [str(tmp_path / "specs")]}
    assert cfg.kernelspecs["eg-yarn"].unserved.startswith("kernelspec 'eg-yarn' asks for process"
                                                         " proxy " + EG + "yarn.")
    assert "add a pool with launcher 'yarn'" in cfg.kernelspecs["eg-yarn"].unserved
    with pytest.raises(ConfigError, match="default_kernelspec: kernelspec 'eg-yarn' asks"):
        load_config(write(tmp_path, {**BASE, "default_kernelspec": "eg-yarn", **dirs}), environ={})
    with pytest.raises(ConfigError, match="warm.eg-yarn: no kernelspec 'eg-yarn' routed"):
        load_config(write(tmp_path, {"pools": {"local": {"launcher": "local", "warm": {
            "eg-yarn": 1}}}, **dirs}), environ={})


def test_spec_routed_to_missing_pool_is_an_error(tmp_path: Path) -> None:
    specs = {"x": {"argv": ARGV, "metadata": {"poolgate": {"pool": "gpus"}}}}
    data = {"pools": {"local": {"launcher": "local"}, "gpu": {"launcher": "local"}}}
    with pytest.raises(ConfigError, match="no pool 'gpus'; did you mean 'gpu'"):
        load_config(write(tmp_path, data, specs), environ={})


def test_bad_kernelspec_json(tmp_path: Path) -> None:
    folder = tmp_path / "specs" / "bad"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text("{nope")
    with pytest.raises(ConfigError, match="kernel.json: not valid JSON"):
        load_config(write(tmp_path, {**BASE, "kernelspec_dirs": [str(tmp_path / "specs")]}), environ={})


def test_yarn_spec_goes_to_the_first_yarn_pool(tmp_path: Path) -> None:
    specs = {"eg-yarn": {"argv": ARGV, "metadata": {"process_proxy": {
        "class_name": EG + "yarn.YarnClusterProcessProxy"}}},
             "gp-yarn": {"argv": ARGV, "metadata": {"kernel_provisioner": {
                 "provisioner_name": "yarn-provisioner"}}}}
    data = {"pools": {"local": {"launcher": "local"},
                      "hadoop": {"launcher": "yarn", "options": {"rm_address": "http://rm:8088"}}}}
    cfg = load_config(write(tmp_path, data, specs), environ={})
    for name in specs:
        assert cfg.kernelspecs[name].pool == "hadoop" and not cfg.kernelspecs[name].unserved


def test_warm_kernels_on_the_launchers_that_can_hand_them_over(tmp_path: Path) -> None:
    specs = {"py-ssh": {"argv": ARGV, "metadata": {"poolgate": {"pool": "ssh"}}},
             "py-yarn": {"argv": ARGV, "metadata": {"poolgate": {"pool": "hadoop"}}}}
    ssh = {"launcher": "ssh", "warm": {"py-ssh": 2}, "options": {
        "hosts": [{"name": "a", "address": "10.0.0.1"}], "port_range": "50000-50999"}}
    hadoop = {"launcher": "yarn", "options": {"rm_address": "http://rm:8088"}}
    cfg = load_config(write(tmp_path, {"pools": {**BASE["pools"], "ssh": ssh, "hadoop": hadoop}},
                            specs), environ={})
    assert cfg.pools["ssh"].warm == {"py-ssh": 2}
    refused = dict(hadoop, warm={"py-yarn": 1})
    (tmp_path / "specs").rename(tmp_path / "specs-1")
    with pytest.raises(ConfigError, match="pools.hadoop.warm.py-yarn: warm kernels need launcher "
                                          "'local' or 'ssh' or 'docker' or 'docker-swarm' or "
                                          "'kubernetes', not "
                                          "'yarn'"):
        load_config(write(tmp_path, {"pools": {**BASE["pools"], "ssh": ssh, "hadoop": refused}},
                          specs), environ={})
