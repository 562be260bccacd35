"""One blueprint per REST resource, with the routes Jupyter Server's clients use."""
from __future__ import annotations

from typing import Any

from flask import request

from ...workers.errors import BadRequest
from ..access import check_owner
from ..auth import User, current_user
from ..state import state


def json_body() -> dict[str, Any]:
    """The request body as a JSON object; no Content-Type is read as JSON too."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    import json

    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def user() -> User:
    """The authenticated caller (gateway/auth.py)."""
    return current_user()


def owned(kid: str) -> None:
    """404, as for an unknown kernel, when kernel ``kid`` is another user's (gateway/access.py)."""
    caller = current_user()
    if not caller.admin:  # admins (and the shared token's anonymous user) own every kernel
        check_owner(state().service.registry.get(kid), kid, caller)
