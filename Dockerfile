# syntax=docker/dockerfile:1
# ciscale container image: a static musl binary on a distroless base.
#
# Static musl build: the TLS stacks ciscale links (ring for reqwest/rustls, aws-lc-rs for the AWS SDK) both build
# for musl with a plain C toolchain — aws-lc-sys ships pregenerated bindings for the x86_64/aarch64 musl targets,
# so neither bindgen nor cmake is needed. Rust on Alpine targets musl natively and links statically by default.
# (Untested on this build machine, which has no docker. If aws-lc-sys ever refuses musl, build on `rust:1-bookworm`
# instead and use `debian:bookworm-slim` plus `ca-certificates` as the runtime stage.)
#
#   docker build -t ciscale .
#   docker run --rm -v $PWD/ciscale.yaml:/etc/ciscale/ciscale.yaml:ro -e HCLOUD_TOKEN ciscale plan

FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev build-base linux-headers cmake perl
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between image builds (the AWS SDK alone takes minutes); the binary
# is copied out because the cache is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ciscale \
    && cp target/release/ciscale /ciscale \
    && /ciscale version

# distroless/static: CA certificates (the AWS SDK reads the system store), /tmp, a non-root user; no shell.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /ciscale /usr/local/bin/ciscale
# The config is mounted here and read as `ciscale.yaml` from this working folder; without it, `PICUS_*` variables
# stand in for it (Picus mode). Not `CISCALE_CONFIG`: a config named explicitly must exist.
WORKDIR /etc/ciscale
ENV CISCALE_LOCK_DIR=/tmp/ciscale
USER nonroot:nonroot
# 9922: `metrics.listen` in the examples (set it to 0.0.0.0:9922 in a container to publish it).
EXPOSE 9922
ENTRYPOINT ["/usr/local/bin/ciscale"]
CMD ["watch"]
