# The agent image: ferroclaw-agent alone, as a non-root user, nothing else in the image.
# Needs a registry (Rust and Debian base images). Offline: docker/build-offline.sh.
#   docker build -f docker/agent.Dockerfile -t ferroclaw-agent:latest .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p ferroclaw-agent --bin ferroclaw-agent

FROM debian:bookworm-slim
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin agent
COPY --from=build /src/target/release/ferroclaw-agent /ferroclaw-agent
USER 10001:10001
ENTRYPOINT ["/ferroclaw-agent"]
