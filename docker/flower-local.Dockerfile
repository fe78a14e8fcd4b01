# Local stand-ins for Flower's flwr/superlink, flwr/supernode and flwr/superexec images, for a
# Docker host that cannot pull them from Docker Hub. Same entrypoints, user and paths as
# Flower's images (user `app`, UID/GID 49999, WORKDIR /app, Flower in a venv on PATH), so
# docker/compose.yml and docker/Dockerfile run on them unchanged.
#
# Built by `python -m fedbip_flower.tools.docker_demo images` (scripts/docker-demo.sh) from a
# base the machine makes itself (a Debian bookworm root file system from debootstrap, imported
# with `docker import`; Python 3.11 from Debian):
#   docker build --network host -f docker/flower-local.Dockerfile --target superlink \
#     --build-arg BASE=fedbip-local/debian:bookworm --build-arg WHEELS=http://127.0.0.1:PORT/ \
#     -t flwr/superlink:1.42.0 docker/
# WHEELS: a find-links page (the helper serves a wheelhouse that the host's own pip filled,
# with the host's index settings and CA bundle); empty: pip uses its default index.
ARG BASE=fedbip-local/debian:bookworm
FROM ${BASE} AS flower

ARG FLWR_VERSION=1.42.0
ARG WHEELS=

# Debian's Python (3.11 on bookworm), a venv for Flower, the user Flower's images run as.
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --home-dir /app --create-home --shell /bin/bash app \
    && python3 -m venv /python/venv \
    && chown -R app:app /python/venv
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

USER app
WORKDIR /app
RUN if [ -n "$WHEELS" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"; fi \
    && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
    && flwr --version

FROM flower AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flower AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flower AS superexec
ENTRYPOINT ["flower-superexec"]
