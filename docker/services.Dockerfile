# The services image: ONE binary, /ferroclaw-services, that is the gateway, runner, delivery,
# scheduler or the ferroclaw CLI by the name it runs under (/ferroclaw-runner, … and
# /ferroclaw link to it; each compose service picks its program with `command`).
# Stripped, FROM scratch with the shared libraries it needs (docker/rootfs.sh).
# Needs a registry (the Rust base image). Offline: docker/build-offline.sh.
#   docker build -f docker/services.Dockerfile -t ferroclaw:latest .
# The debug info of the binary, as its own stage:
#   docker build -f docker/services.Dockerfile --target debuginfo -o debuginfo .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferroclaw-services --bin ferroclaw-services
RUN bash docker/rootfs.sh /rootfs /debuginfo target/release/ferroclaw-services \
      ferroclaw-gateway ferroclaw-runner ferroclaw-delivery ferroclaw-scheduler ferroclaw

FROM scratch AS debuginfo
COPY --from=build /debuginfo/ /

FROM scratch
COPY --from=build /rootfs/ /
CMD ["/ferroclaw", "--help"]
