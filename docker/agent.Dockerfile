# The agent image: ferroclaw-agent alone (stripped), as a non-root user, FROM scratch with
# the shared libraries it needs (docker/rootfs.sh), nothing else in the image.
# Needs a registry (the Rust base image). Offline: docker/build-offline.sh.
#   docker build -f docker/agent.Dockerfile -t ferroclaw-agent:latest .
# The debug info of the binary, as its own stage:
#   docker build -f docker/agent.Dockerfile --target debuginfo -o debuginfo .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferroclaw-agent --bin ferroclaw-agent
RUN bash docker/rootfs.sh /rootfs /debuginfo target/release/ferroclaw-agent

FROM scratch AS debuginfo
COPY --from=build /debuginfo/ /

FROM scratch
COPY --from=build /rootfs/ /
USER 10001:10001
ENTRYPOINT ["/ferroclaw-agent"]
