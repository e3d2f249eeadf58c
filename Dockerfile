# adtrack images, built from the workspace root.
#
#   docker build -t adtrack:dev .
#       the service image (the last stage, `runtime`): tracker, consumer and
#       updater in /usr/local/bin, non-root, default command `tracker`;
#       `docker run adtrack:dev consumer` or `... updater load -` pick another.
#
#   docker build --target lambda-zip --output type=local,dest=dist .
#       dist/consumer-lambda.zip and dist/updater-lambda.zip: the Lambda
#       consumer and the core-data updater, each as `bootstrap` for the
#       provided.al2023 runtime (x86_64, statically linked against musl, so
#       the glibc of the Lambda image does not matter).
#
# Dependencies are compiled in a layer of their own (cargo-chef "cook"), keyed
# only by Cargo.toml/Cargo.lock, so a source change rebuilds only the
# workspace's own crates. Build and push to ECR: cloudformation/README.md.

# ---------------------------------------------------------------------------
# chef: the Rust toolchain plus cargo-chef, shared by every build stage.
FROM rust:1.95-slim-bookworm AS chef
ARG CARGO_CHEF_VERSION=0.1.77
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cmake: aws-lc-sys falls back to it when its cc build does not fit the target.
# Unpinned on purpose: Debian's archive drops superseded versions, so exact
# pins break rebuilds; the base image tag pins the release (bookworm).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}" \
 && rm -rf "${CARGO_HOME}/registry" "${CARGO_HOME}/git"
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
WORKDIR /src

# ---------------------------------------------------------------------------
# planner: reduces the workspace to its dependency graph (recipe.json), which
# changes only when a manifest or the lockfile does.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# builder: the three service binaries, glibc (bookworm, same as the runtime).
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
COPY .cargo/ .cargo/
RUN cargo chef cook --release --locked --recipe-path recipe.json \
      --bin tracker --bin consumer --bin updater
COPY . .
RUN cargo build --release --locked --bin tracker --bin consumer --bin updater \
 && install -d /out \
 && install -m 0755 target/release/tracker target/release/consumer target/release/updater /out/

# ---------------------------------------------------------------------------
# lambda-builder: the two Lambdas, static musl builds, each named `bootstrap`
# in its own zip.
FROM chef AS lambda-builder
# musl-tools: musl-gcc for the C parts (ring, aws-lc-sys); zip packs the bundle.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools zip \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
COPY --from=planner /src/recipe.json recipe.json
COPY .cargo/ .cargo/
RUN cargo chef cook --release --locked --target x86_64-unknown-linux-musl \
      --recipe-path recipe.json --bin consumer-lambda --bin updater-lambda
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      --bin consumer-lambda --bin updater-lambda \
 && for fn in consumer-lambda updater-lambda; do \
      install -d "/out/$fn" \
      && install -m 0755 "target/x86_64-unknown-linux-musl/release/$fn" "/out/$fn/bootstrap" \
      && touch -t 198001020000 "/out/$fn/bootstrap" \
      && zip -X -j "/out/$fn.zip" "/out/$fn/bootstrap"; \
    done

# ---------------------------------------------------------------------------
# lambda-zip: only the zips, for `--output type=local,dest=dist`.
FROM scratch AS lambda-zip
COPY --from=lambda-builder /out/consumer-lambda.zip /out/updater-lambda.zip /

# ---------------------------------------------------------------------------
# runtime: the service image (last stage, so the default build target).
FROM debian:bookworm-slim AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# ca-certificates: TLS to AWS endpoints and to ElastiCache (rediss://).
# Unpinned for the reason given in the chef stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 adtrack \
 && useradd --system --uid 10001 --gid adtrack --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin adtrack \
 && install -d -o adtrack -g adtrack -m 0750 /var/lib/adtrack /var/lib/adtrack/spool
COPY --from=builder /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="adtrack" \
      org.opencontainers.image.description="adtrack tracker, consumer and updater" \
      org.opencontainers.image.licenses="Apache-2.0"
# Writable state (the tracker's disk spool, TRACKER_SPOOL_DIR) goes here; in
# ECS it is the task volume `data`, as the root filesystem is mounted
# read-only. Declared as a VOLUME so that Fargate (and Docker) give the
# mounted volume this directory's owner, user 10001: without it a bind-mount
# volume is owned by root and the tracker cannot create its spool.
VOLUME ["/var/lib/adtrack"]
USER 10001:10001
WORKDIR /var/lib/adtrack
# 8080 public HTTP (tracker), 9090 tracker admin (/metrics), 9091 consumer admin.
EXPOSE 8080 9090 9091
# Readiness of the tracker (admin port /health/ready on 127.0.0.1). Images run
# as `consumer` or `updater` should be started with --no-healthcheck; ECS
# ignores this instruction and uses the task definition's own health check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["tracker", "--healthcheck"]
CMD ["tracker"]
