"""What an authenticated user may do: own kernels only, and who may start which kernelspec.

Rule: the authenticated user, not the request body, owns a kernel and is its KERNEL_USERNAME
(:func:`as_user`). A user sees and drives only kernels and sessions they own; another user's
look exactly like unknown ones (404), so ids cannot be probed. Admins, and the anonymous user
of a shared token (everyone is that one user), see everything.

Who may start what (:func:`refusal`, pure: tested with literal configs) is decided by the pool
(``kernelspecs``, ``allowed_users``, ``denied_users``) and the kernelspec
(``metadata.poolgate.allowed_users`` / ``denied_users``). ``root`` is refused on launchers
that run kernels as the user unless the pool's ``allowed_users`` names it.
"""
from __future__ import annotations

from typing import Any

from ..workers.config import KernelSpec, PoolConfig
from ..workers.errors import KernelNotFound, cut
from ..workers.registry import KernelRecord
from .auth import User

#: Launchers where KERNEL_USERNAME picks the account the kernel runs as.
RUNS_AS_USER = {"ssh"}


def as_user(env: dict[str, str], user: User) -> dict[str, str]:
    """The launch env with the authenticated user as KERNEL_USERNAME (anonymous: as sent)."""
    if user.name:
        return {**env, "KERNEL_USERNAME": user.name}
    return env


def refusal(spec: KernelSpec, pool: PoolConfig, user: str) -> str | None:
    """Why ``user`` may not start ``spec`` on ``pool``, or None when they may."""
    who = repr(user or "(none)")
    if pool.kernelspecs and spec.name not in pool.kernelspecs:
        return f"pool {pool.name!r} does not serve kernelspec {spec.name!r}"
    if user in pool.denied_users:
        return f"pool {pool.name!r} refuses user {who} (denied_users)"
    if pool.allowed_users and user not in pool.allowed_users:
        return (f"pool {pool.name!r} does not serve user {who}; set KERNEL_USERNAME to an "
                f"allowed user")
    if user in spec.users("denied_users"):
        return f"kernelspec {spec.name!r} refuses user {who} (metadata.poolgate.denied_users)"
    allowed = spec.users("allowed_users")
    if allowed and user not in allowed:
        return f"kernelspec {spec.name!r} is not for user {who} (metadata.poolgate.allowed_users)"
    if user == "root" and pool.launcher in RUNS_AS_USER and "root" not in pool.allowed_users:
        return (f"pool {pool.name!r} runs kernels as the user, and root is refused unless the "
                f"pool's allowed_users names it")
    return None


def visible(rec: KernelRecord | None, user: User) -> KernelRecord | None:
    """The record if ``user`` may see it, else None."""
    return rec if rec is not None and user.owns(rec.user) else None


def check_owner(rec: KernelRecord | None, kid: str, user: User) -> None:
    """404, as for an unknown kernel, when ``rec`` exists but belongs to someone else."""
    if rec is not None and not user.owns(rec.user):
        raise KernelNotFound(f"kernel {cut(kid)} not found")


def session_visible(sess: dict[str, Any], user: User) -> bool:
    return user.owns(str(sess.get("user", "")))
