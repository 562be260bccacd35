"""The cheap test kernel and its launcher: many kernels in one process (issue 24, scale)."""
