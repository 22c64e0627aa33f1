# syntax=docker/dockerfile:1
# The Weft image: `weft` (sidecar, inject, iptables) and `weft-ca`, used by
# every container of deploy/k8s.
#
#   docker build -t weft:latest .
#   kind load docker-image weft:latest        # or push it and set the image in kustomize
#
# Runtime: Debian slim, not distroless or `scratch`. The iptables init
# container runs `weft iptables install`, which drives iptables-restore and
# ip6tables-restore, so the image needs iptables and the glibc it links
# against. The binaries are built on the same Debian release (bookworm,
# glibc 2.36) and linked dynamically against that glibc, which the runtime
# has anyway: a static musl build would save nothing here and adds an
# aws-lc-rs cross-toolchain risk.
#
# Not built in CI (no container engine there); see docs/kubernetes.md.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Smaller binaries: no debug info, symbols stripped (release keeps debug = 1 otherwise).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft-proxy --bin weft -p weft-ca --bin weft-ca \
    && install -D -m 0755 -t /out target/release/weft target/release/weft-ca

FROM debian:bookworm-slim
# iptables: for the weft-iptables init container (nft backend by default; it
# only touches the pod's own network namespace). ca-certificates: for OTLP or
# Zipkin exporters behind public HTTPS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1337 weft \
    && useradd --system --uid 1337 --gid 1337 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin weft
COPY --from=build /out/ /usr/local/bin/
# 1337 is the UID the iptables rules exempt (weft iptables install --proxy-uid):
# the sidecar runs as it. The init container sets runAsUser: 0 itself.
USER 1337:1337
EXPOSE 15000/tcp 15001/tcp 15008/udp 8443/tcp
CMD ["weft", "--help"]
