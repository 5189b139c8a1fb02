# Build in one stage (Pingora needs cmake and a C toolchain), run as non-root in a slim one.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meraki-oauth-proxy

FROM debian:bookworm-slim
# ca-certificates: upstream TLS to Meraki is verified against the platform roots (rustls).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/meraki-oauth-proxy proxy
COPY --from=build /src/target/release/meraki-oauth-proxy /usr/local/bin/meraki-oauth-proxy
USER 10001
WORKDIR /var/lib/meraki-oauth-proxy
# The token store and audit log live here (relative paths resolve against the config's folder,
# so mount the config at /etc/meraki-oauth-proxy and point store.path/audit.path at this volume).
VOLUME ["/var/lib/meraki-oauth-proxy"]
EXPOSE 8080 9090
ENTRYPOINT ["meraki-oauth-proxy"]
CMD ["run", "--config", "/etc/meraki-oauth-proxy/proxy.toml"]
