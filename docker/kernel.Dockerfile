# A kernel image: python3, ipykernel, cryptography and poolgate's kernel launcher (one file).
# BASE_IMAGE: poolgate/debian-base:<release> (docker/build-images.sh makes it) or any Debian
# based image, e.g. python:3.12-slim, whose pip is then used instead of Debian's packages.
ARG BASE_IMAGE=poolgate/debian-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN if command -v pip >/dev/null 2>&1; then \
        pip install --no-cache-dir ipykernel cryptography; \
    else \
        apt-get update -qq && \
        apt-get install -y -qq --no-install-recommends python3-ipykernel python3-cryptography \
            >/dev/null && \
        rm -rf /var/lib/apt/lists/*; \
    fi
# Unprivileged by default; KERNEL_UID/KERNEL_GID (where the pool allows) override it.
RUN (getent group jovyan || groupadd -g 1000 jovyan) && \
    (id jovyan || useradd -m -u 1000 -g 1000 -s /bin/sh jovyan)
COPY docker/kernel-launcher-init.py /opt/poolgate/poolgate/__init__.py
COPY poolgate/kernel_launcher.py /opt/poolgate/poolgate/kernel_launcher.py
ENV PYTHONPATH=/opt/poolgate PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/jovyan
CMD ["python3", "-m", "poolgate.kernel_launcher", "--help"]
