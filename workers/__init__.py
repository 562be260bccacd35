"""Pool workers: the Celery app, the ``kernels.host`` task and the launchers.

The rule of this package: ``config``, ``protocol``, ``errors``, ``registry`` and ``resources``
(admission of KERNEL_GPUS/CPUS/MEMORY) are shared with ``gateway/`` and import no Flask, no
Celery and no backend library. Everything else here
(``celery_app``, ``tasks``, ``supervisor``, ``launchers``) runs only in pool workers.

``workers.celery`` holds the one module-level Celery app, for ``celery -A workers …``;
nothing in this project imports it.
"""
