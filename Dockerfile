# Build with the Rust toolchain (Pingora needs cmake and a C compiler), run as non-root in a slim
# image. `docker build .`; deploy/README.md says how to run it, scripts/image-test.sh builds and
# runs it in CI without a Docker daemon.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore keeps target/, .git, local token stores and keys out of the context.
COPY . .
# Without the release profile's debuginfo (kept for profiling on developer machines): the binary
# is about 16 MB instead of 80, and panics still name their functions.
RUN CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked --bin meraki-oauth-proxy

FROM debian:bookworm-slim
# ca-certificates: upstream TLS to Meraki is verified against the platform roots (rustls).
# The account is not called "proxy": Debian's base-passwd already has that one (uid 13).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 meraki-oauth-proxy \
 && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/meraki-oauth-proxy --shell /usr/sbin/nologin meraki-oauth-proxy \
 && install -d -o 10001 -g 10001 -m 700 /var/lib/meraki-oauth-proxy
COPY --from=build /src/target/release/meraki-oauth-proxy /usr/local/bin/meraki-oauth-proxy
USER 10001:10001
WORKDIR /var/lib/meraki-oauth-proxy
# The token store and the audit log live here. Mount the config at /etc/meraki-oauth-proxy
# (read only) and give store.path and audit.path absolute paths in this volume: relative paths
# resolve against the config's directory.
VOLUME ["/var/lib/meraki-oauth-proxy"]
# 8080: the proxy; 9090: the admin listener (/healthz, /readyz, /metrics, grant onboarding).
EXPOSE 8080 9090
ENTRYPOINT ["meraki-oauth-proxy"]
CMD ["run", "--config", "/etc/meraki-oauth-proxy/proxy.toml"]
