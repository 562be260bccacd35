"""Pool workers: the Celery app, the ``kernels.host`` task and the launchers.

The rule of this package: ``config`` (with ``typed`` and ``launcher_options``), ``protocol``,
``errors``, ``registry`` and ``resources`` (admission of KERNEL_GPUS/CPUS/MEMORY) are shared with
``gateway/`` and import no Flask, no Celery and no backend library; nor do the launchers' pure
``*_builders`` modules, which hold each launcher's options. Everything else here
(``celery_app``, ``tasks``, ``runtime``, ``supervisor``, the launchers themselves) runs only in
pool workers (tests/test_imports.py checks what a gateway process loads).

``poolgate.workers.celery`` holds the one module-level Celery app, for ``celery -A poolgate.workers …``;
nothing in this project imports it.
"""
