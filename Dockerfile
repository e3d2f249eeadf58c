# adtrack images, built from the workspace root, for linux/amd64 or
# linux/arm64 (Graviton): the build stages run on the build machine's own
# platform and cross-compile for the one asked for (--platform).
#
#   docker build --platform linux/arm64 -t adtrack:dev .
#       the service image (the last stage, `runtime`): tracker, consumer and
#       updater in /usr/local/bin, non-root, default command `tracker`;
#       `docker run adtrack:dev consumer` or `... updater load -` pick another.
#       The runtime stage runs apt-get for the target platform: building for
#       the other architecture than the machine's needs QEMU's binfmt
#       handlers (Docker Desktop has them; elsewhere
#       `docker run --privileged --rm tonistiigi/binfmt --install arm64`).
#
#   docker build --platform linux/arm64 --target lambda-zip --output type=local,dest=dist .
#       dist/consumer-lambda.zip and dist/updater-lambda.zip: the Lambda
#       consumer and the core-data updater, each as `bootstrap` for the
#       provided.al2023 runtime, statically linked against musl (so the glibc
#       of the Lambda image does not matter), built by cargo-lambda (zig as
#       the cross linker and C compiler).
#
# Dependencies of the service binaries are compiled in a layer of their own
# (cargo-chef "cook"), keyed only by Cargo.toml/Cargo.lock, so a source change
# rebuilds only the workspace's own crates; the Lambda build keeps its target
# directory in a BuildKit cache mount instead. dev/cross-arm64 and
# dev/lambda-musl run the same cross builds outside Docker (./dev/test). Build and push to ECR:
# cloudformation/README.md (cloudformation/deploy does it).

# ---------------------------------------------------------------------------
# chef: the Rust toolchain plus cargo-chef, shared by every build stage, on
# the build machine's platform.
FROM --platform=$BUILDPLATFORM rust:1.95-slim-bookworm AS chef
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
FROM --platform=$BUILDPLATFORM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# builder: the three service binaries for the target platform, glibc
# (bookworm, same as the runtime): native on amd64, cross-compiled with
# Debian's aarch64 gcc for arm64.
FROM --platform=$BUILDPLATFORM chef AS builder
ARG TARGETARCH
# The aarch64 cross gcc and libc, unpinned for the reason given in the chef
# stage.
# hadolint ignore=DL3008
RUN case "${TARGETARCH}" in \
      amd64) echo x86_64-unknown-linux-gnu > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-gnu > /rust-target \
             && apt-get update \
             && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
             && rm -rf /var/lib/apt/lists/* ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /rust-target)"
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
COPY --from=planner /src/recipe.json recipe.json
COPY .cargo/ .cargo/
RUN cargo chef cook --release --locked --target "$(cat /rust-target)" \
      --recipe-path recipe.json --bin tracker --bin consumer --bin updater
COPY . .
RUN target="$(cat /rust-target)" \
 && cargo build --release --locked --target "$target" \
      --bin tracker --bin consumer --bin updater \
 && install -d /out \
 && install -m 0755 "target/$target/release/tracker" "target/$target/release/consumer" \
      "target/$target/release/updater" /out/

# ---------------------------------------------------------------------------
# lambda-builder: the two Lambdas for the target platform, static musl
# builds by cargo-lambda, each named `bootstrap` in its own zip.
FROM --platform=$BUILDPLATFORM chef AS lambda-builder
ARG TARGETARCH
ARG CARGO_LAMBDA_VERSION=1.9.2
# python3-venv: cargo-lambda and the zig it cross-links with come from PyPI
# (pinned by CARGO_LAMBDA_VERSION); python3-venv unpinned as in the chef stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/cargo-lambda \
 && /opt/cargo-lambda/bin/pip install --no-cache-dir "cargo-lambda==${CARGO_LAMBDA_VERSION}" \
 && case "${TARGETARCH}" in \
      amd64) echo x86_64-unknown-linux-musl > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-musl > /rust-target ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /rust-target)"
ENV PATH=/opt/cargo-lambda/bin:$PATH
COPY . .
RUN --mount=type=cache,target=/src/target,id=lambda-target-${TARGETARCH} \
    --mount=type=cache,target=/usr/local/cargo/registry \
    cargo lambda build --release --locked --target "$(cat /rust-target)" \
      --output-format zip --bin consumer-lambda --bin updater-lambda \
 && install -d /out \
 && install -m 0644 target/lambda/consumer-lambda/bootstrap.zip /out/consumer-lambda.zip \
 && install -m 0644 target/lambda/updater-lambda/bootstrap.zip /out/updater-lambda.zip

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
# mimalloc (the binaries' allocator) gives freed pages back to the system at
# once instead of after 10 ms: the tracker's RSS after 240,000 pixel hits at
# 30,000/s with 100,000 programs is 69.5-70.1 MiB against 88.2-88.8 MiB, at
# no more CPU (bench/README.md, "Memory").
ENV MIMALLOC_PURGE_DELAY=0
# 8080 public HTTP (tracker), 9090 tracker admin (/metrics), 9091 consumer admin.
EXPOSE 8080 9090 9091
# Readiness of the tracker (admin port /health/ready on 127.0.0.1). Images run
# as `consumer` or `updater` should be started with --no-healthcheck; ECS
# ignores this instruction and uses the task definition's own health check.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["tracker", "--healthcheck"]
CMD ["tracker"]
