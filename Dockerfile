# syntax=docker/dockerfile:1
# One image with the three binaries: ipn-ingress (default), ipn-worker and ipnctl.
# Build: docker build -t ipn-bridge .   (docker-compose.yml builds it for you)

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The manifest names the benches and the test binary, so their sources come along.
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY benches benches
COPY tests tests
# The registry and the target directory live in BuildKit cache mounts: after a source edit only
# our crate is compiled again, not every dependency (minutes on two cores). The binaries are
# copied out of the cache, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir /out \
 && cp target/release/ipn-ingress target/release/ipn-worker target/release/ipnctl /out/

FROM debian:bookworm-slim
# CA certificates for the TLS postback to PayPal and for SMTPS/HTTPS alerts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home ipn
COPY --from=build /out/ /usr/local/bin/
USER 10001:10001
EXPOSE 8080 8081
# The compose file's healthchecks run `ipnctl health http://127.0.0.1:<port>/readyz`.
CMD ["ipn-ingress"]
