# pgnear's image. Two ways to get the binary in, one runtime stage:
#
#   docker build .                 compile it in the build stage
#   docker build --target host .   copy one built on this host
#                                  (target/release/pgnear, or
#                                  --build-arg PGNEAR_BINARY=path)
#
# BASE is the runtime image; tests/container/run.sh sets it to a local
# Debian bookworm rootfs, since no registry is reachable there.
ARG BASE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1-slim-bookworm

# Build stage: compile a release binary.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# No line tables in the image's binary: about 17 MB instead of 78.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
RUN cargo build --release --locked --bin pgnear \
    && install -D target/release/pgnear /out/pgnear

# The runtime image, without its binary: the targets below add it.
FROM ${BASE} AS runtime
# debian:bookworm-slim lacks CA certificates (for a node's sslrootcert
# from the system store); a base that has them already skips apt, so the
# local build needs no network. The user is written into /etc/passwd and
# /etc/group directly, the same on any base.
RUN set -eu; \
    if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    echo 'pgnear:x:10001:10001:pgnear:/nonexistent:/usr/sbin/nologin' >>/etc/passwd; \
    echo 'pgnear:x:10001:' >>/etc/group
# The sample config, listening on every interface: a container's loopback
# cannot be reached through a published port. Mount your own over it.
COPY proxy.toml /etc/pgnear/proxy.toml
RUN sed -i 's/^\(listen\|admin_listen\) = "127\.0\.0\.1:/\1 = "0.0.0.0:/' /etc/pgnear/proxy.toml
# Numeric, so that runAsNonRoot in Kubernetes can verify it.
USER 10001:10001
# 6432: PostgreSQL clients; 9930: admin HTTP (/metrics, /health, /ready).
EXPOSE 6432 9930
# SIGTERM drains (no new clients, pgnear exits when the last one leaves);
# a second SIGTERM closes what is left.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/pgnear"]
CMD ["--config", "/etc/pgnear/proxy.toml"]

# --target host: a binary built outside, for the same Debian release as
# BASE (it links glibc dynamically). The build stage is not run.
FROM runtime AS host
ARG PGNEAR_BINARY=target/release/pgnear
COPY ${PGNEAR_BINARY} /usr/local/bin/pgnear

# The default target (last): the build stage's binary.
FROM runtime
COPY --from=build /out/pgnear /usr/local/bin/pgnear
