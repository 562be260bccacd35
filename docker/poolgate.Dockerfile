# The gateway and worker image (one image; the command picks the role): poolgate in a venv,
# installed from a wheelhouse that docker/build-images.sh makes on the host (docker/wheels/:
# deps/ and app/, poolgate's own wheel, installed last),
# so the build needs no package index. Debian's redis-server is included for the compose file's
# Redis (no registry here to pull redis from).
# BASE_IMAGE must have the host's Python minor version (the wheelhouse's binary wheels):
# poolgate/debian-base:bookworm (3.11) on this project's machines, or python:3.11-slim.
ARG BASE_IMAGE=poolgate/debian-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq && \
    apt-get install -y -qq --no-install-recommends redis-server ca-certificates \
        $(command -v python3 >/dev/null 2>&1 || echo python3 python3-venv) >/dev/null && \
    rm -rf /var/lib/apt/lists/*
COPY docker/wheels/deps/ /tmp/wheels/
RUN python3 -m venv /opt/poolgate && \
    /opt/poolgate/bin/pip install -q --no-index --find-links /tmp/wheels /tmp/wheels/*.whl && \
    rm -rf /tmp/wheels && \
    useradd -m -u 1001 -s /bin/sh poolgate
# poolgate itself last: a change to it rebuilds only this layer
COPY docker/wheels/app/ /tmp/app/
RUN /opt/poolgate/bin/pip install -q --no-index --no-deps /tmp/app/*.whl && rm -rf /tmp/app
ENV PATH=/opt/poolgate/bin:$PATH PYTHONUNBUFFERED=1
USER poolgate
WORKDIR /home/poolgate
EXPOSE 8888
CMD ["poolgate", "gateway", "--ip", "0.0.0.0", "--config", "/etc/poolgate/queues.yaml"]
