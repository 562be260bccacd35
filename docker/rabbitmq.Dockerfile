# RabbitMQ for docker/compose.rabbitmq.yaml: Debian's rabbitmq-server (no registry here to pull
# rabbitmq from). The compose file sets its ports and node name so that, on the host's network,
# it does not meet a RabbitMQ already on the host (5672, 4369, 25672).
ARG BASE_IMAGE=poolgate/debian-base:bookworm
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq && \
    apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null && \
    rm -rf /var/lib/apt/lists/*
# logs to stdout (docker logs); the package's wrapper would write them to files
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- RABBITMQ_SASL_LOGS=-
USER rabbitmq
WORKDIR /var/lib/rabbitmq
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
