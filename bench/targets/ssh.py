"""poolgate-ssh and poolgate-ssh-warm: `poolgate serve` whose bench kernelspec runs on an ssh pool
of one host, a real sshd the bench starts on 127.0.0.2 (tests/sshd.py's way: its own host key,
key-only login for the current user), with and without one warm kernel.

Both run the **start** scenario only. poolgate-ssh-warm waits before each start until
/api/pools shows the warm kernel ready, so each start is the start with a warm kernel there; the
report prints its ratio to poolgate-ssh (issue 24's target: ≤ 0.1). The `poolgate serve` they start
runs this checkout's code (PYTHONPATH), whichever poolgate is installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.progress import say
from bench.targets.base import TargetUnavailable
from bench.targets.poolgate import PoolgateTarget, PoolgateWarmTarget

ADDRESS = "127.0.0.2"
CHECKOUT = Path(__file__).resolve().parents[2]


class PoolgateSSHTarget(PoolgateTarget):
    """`poolgate serve --config C`, C routing the bench's kernelspec to an ssh pool of one sshd."""

    name = "poolgate-ssh"
    scenarios = ("start",)
    warm = 0

    def env(self, workdir: Path) -> dict[str, str]:
        env = super().env(workdir)
        env["PYTHONPATH"] = str(CHECKOUT)
        return env

    def start_sshd(self, folder: Path) -> Any:
        """The host: an sshd on 127.0.0.2 that lets this user in with a fresh key."""
        try:
            from tests.sshd import SSHD, keygen
        except ImportError as exc:
            raise TargetUnavailable(f"tests/sshd.py cannot be imported ({exc}); run the bench "
                                    "from the repository root") from exc
        shutil.rmtree(folder, ignore_errors=True)  # an earlier round's keys and host
        folder.mkdir(parents=True)
        try:
            key = keygen(folder / "id_ed25519")
            authorized = folder / "authorized_keys"
            authorized.write_text(key.with_suffix(".pub").read_text())
            self.sshd = SSHD(folder / "host", ADDRESS, authorized).start()
        except BaseException as exc:  # tests/sshd.py fails the way pytest does
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TargetUnavailable(f"no sshd on {ADDRESS}: {exc}") from exc
        (folder / "known_hosts").write_text(self.sshd.known_hosts_line)
        return key

    def write_config(self, workdir: Path) -> Path:
        from poolgate.workers.config import packaged_data

        key = self.start_sshd(workdir / "ssh")
        self.remote_dir = str(workdir / "ssh" / "remote")
        raw = yaml.safe_load((packaged_data() / "queues.yaml").read_text())
        pool: dict[str, Any] = {"launcher": "ssh", "launch_timeout": 60, "options": {
            "hosts": [{"name": "a", "address": ADDRESS, "port": self.sshd.port,
                       "max_kernels": 8}],
            "key_file": str(key), "known_hosts": str(workdir / "ssh" / "known_hosts"),
            "python": sys.executable, "remote_dir": self.remote_dir,
            "port_range": "47000-47999"}}
        if self.warm:
            pool["warm"] = {self.ctx.kernel_name: self.warm}
        raw["pools"]["ssh"] = pool
        specs = workdir / "specs"
        (specs / self.ctx.kernel_name).mkdir(parents=True, exist_ok=True)
        (specs / self.ctx.kernel_name / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"{self.ctx.kernel_name} (ssh)", "language": "python",
            "metadata": {"poolgate": {"pool": "ssh"}}}))
        raw["kernelspec_dirs"] = [str(specs)]
        config = workdir / "queues.yaml"
        config.write_text(yaml.safe_dump(raw))
        return config

    async def start(self) -> None:
        workdir = self.ctx.workdir / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        self.pool = "ssh"
        config = self.write_config(workdir)
        self.ctx.extra_args.setdefault(self.name, [])[:0] = ["--config", str(config)]
        await super().start()

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            sshd = getattr(self, "sshd", None)
            if sshd is not None:
                sshd.power_off(self.remote_dir)


class PoolgateSSHWarmTarget(PoolgateSSHTarget):
    """poolgate-ssh with `warm: {python3: 1}` on the ssh pool; each start once it is ready."""

    name = "poolgate-ssh-warm"
    warm = 1
    before_start = PoolgateWarmTarget.before_start

    def started(self, model: dict[str, Any]) -> None:
        timing = (model.get("poolgate") or {}).get("timing", {})
        if timing.get("warm") is False:
            say(f"{self.name}: started cold: {timing.get('cold_because')}")
        else:
            PoolgateWarmTarget.started(self, model)  # type: ignore[arg-type]
