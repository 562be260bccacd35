"""poolgate in a kernel image: only the kernel launcher."""
