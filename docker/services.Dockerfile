# The services image: gateway, runner, delivery, scheduler and the ferroclaw CLI (each
# compose service picks its binary with `command`).
# Needs a registry (Rust and Debian base images). Offline: docker/build-offline.sh.
#   docker build -f docker/services.Dockerfile -t ferroclaw:latest .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins \
      -p ferroclaw-gateway -p ferroclaw-runner -p ferroclaw-delivery -p ferroclaw-scheduler -p ferroclaw-cli

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ferroclaw-gateway /src/target/release/ferroclaw-runner \
     /src/target/release/ferroclaw-delivery /src/target/release/ferroclaw-scheduler \
     /src/target/release/ferroclaw /
CMD ["/ferroclaw", "--help"]
