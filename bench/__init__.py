"""poolgate's benchmark harness: the same scenarios against poolgate and the gateways it
replaces (Enterprise Gateway, Kernel Gateway), with jupyter_client alone as the floor.

Run `python -m bench --help`; see bench/README.md.
"""
