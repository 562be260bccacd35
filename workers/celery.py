"""The module-level Celery app for ``celery -A poolgate.workers worker|inspect|flower …``.

Built from ``./queues.yaml`` (or ``POOLGATE_CONFIG``) and the packaged defaults. Nothing in
this project imports this module; poolgate's own commands build their app with make_celery.
"""
from __future__ import annotations

import os

from .celery_app import make_celery
from .config import load_config

app = make_celery(load_config(os.environ.get("POOLGATE_CONFIG")))
