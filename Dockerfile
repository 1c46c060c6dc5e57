# syntax=docker/dockerfile:1
# Images of the three services (docs/deploy.md), one per device kind:
#   docker build --target cpu  -t mulo-cpu  .    CPU libtorch
#   docker build --target cuda -t mulo-cuda .    PyTorch 2.11.0's CUDA 13 libraries
# The build stages compile against the pinned PyTorch (scripts/setup-torch.sh, from PyPI); the
# images carry only the three binaries, the libtorch libraries they load (gathered and checked by
# scripts/collect-runtime.sh) and the bundled emoji family (the default family; mount another
# and set MULO_FAMILY for real models). They run as UID 65532 and write nothing.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build-base
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .

FROM build-base AS build-cpu
RUN MULO_TORCH_VENV=/opt/torch bash scripts/setup-torch.sh --variant cpu \
 && cargo build --release --locked -p mulo-services \
 && bash scripts/collect-runtime.sh "$(sed -n 's/^LIBTORCH = "\(.*\)"/\1/p' .cargo/config.toml)" target/release /out

FROM build-base AS build-cuda
RUN MULO_TORCH_VENV=/opt/torch bash scripts/setup-torch.sh --variant cuda \
 && cargo build --release --locked -p mulo-services \
 && bash scripts/collect-runtime.sh "$(sed -n 's/^LIBTORCH = "\(.*\)"/\1/p' .cargo/config.toml)" target/release /out

FROM ${RUNTIME_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY models/emoji /opt/mulo/models/emoji
ENV LD_LIBRARY_PATH=/opt/mulo/lib \
    MULO_FAMILY=/opt/mulo/models/emoji
# gRPC: gateway 50051, drafter 50061, verifier 50062; Prometheus metrics 9090 (MULO_METRICS_LISTEN).
EXPOSE 50051 50061 50062 9090
USER 65532:65532

FROM runtime AS cpu
COPY --from=build-cpu /out/bin/ /usr/local/bin/
COPY --from=build-cpu /out/lib/ /opt/mulo/lib/
ENV MULO_DEVICE=cpu
CMD ["/usr/local/bin/mulo-gateway", "--help"]

FROM runtime AS cuda
COPY --from=build-cuda /out/bin/ /usr/local/bin/
COPY --from=build-cuda /out/lib/ /opt/mulo/lib/
ENV MULO_DEVICE=cuda
CMD ["/usr/local/bin/mulo-gateway", "--help"]
