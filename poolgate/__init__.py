"""poolgate: a Jupyter kernel gateway whose kernels are long-running Celery tasks."""

__version__ = "0.1.0"
