# syntax=docker/dockerfile:1
# The setpoint engine image: `docker build -t setpoint:0.1.0 .` (see README, "Deploy on AWS").
#
# Stage 1 builds the release binary; stage 2 is a slim Debian with CA certificates (AWS APIs, the
# Kubernetes API and SMTP servers are verified against them) and a non-root user. The build needs
# no protoc (protox compiles the .proto files) and no database (no compile-time SQL checks).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# The caches keep the registry and compiled dependencies between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin setpoint \
    && cp target/release/setpoint /usr/local/bin/setpoint

FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 setpoint \
    && useradd --system --uid 10001 --gid setpoint --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin setpoint
COPY --from=build /usr/local/bin/setpoint /usr/local/bin/setpoint
USER 10001:10001
# Listen on all interfaces inside the container (the binary's defaults are loopback only);
# the Terraform module sets the same variables explicitly.
ENV SETPOINT_LISTEN=0.0.0.0:50051 \
    SETPOINT_METRICS_LISTEN=0.0.0.0:9090 \
    SETPOINT_LOG_FORMAT=json
# gRPC API, and /metrics, /healthz, /readyz.
EXPOSE 50051 9090
# `setpoint serve` by default; any other subcommand by replacing the command, e.g.
# `docker run … setpoint:0.1.0 work list` or an ECS command override ["migrate"].
ENTRYPOINT ["setpoint"]
CMD ["serve"]
