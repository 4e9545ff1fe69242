# Build stage: compile a release binary.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# No line tables in the image's binary: about 17 MB instead of 78.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
RUN cargo build --release --locked --bin pgnear

# Runtime stage: the binary alone, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home pgnear
COPY --from=build /src/target/release/pgnear /usr/local/bin/pgnear
# The sample config, listening on every interface: a container's loopback
# cannot be reached through a published port. Mount your own over it.
COPY proxy.toml /etc/pgnear/proxy.toml
RUN sed -i 's/^\(listen\|admin_listen\) = "127\.0\.0\.1:/\1 = "0.0.0.0:/' /etc/pgnear/proxy.toml
USER pgnear
# 6432: PostgreSQL clients; 9930: admin HTTP (/metrics, /health, /ready).
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/pgnear"]
CMD ["--config", "/etc/pgnear/proxy.toml"]
