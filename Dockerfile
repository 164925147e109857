# camserve on CPU. Build: docker build -t camserve:0.1.0 .   (the CUDA image: Dockerfile.cuda)
# Every build step is scripts/build-release.sh, which CI also runs (make image-root) without Docker.

# ONNX Runtime from its PyPI wheel; only the shared library leaves this stage.
FROM python:3.11-slim-bookworm AS ort
WORKDIR /build
COPY scripts/build-release.sh scripts/
RUN scripts/build-release.sh ort /opt/camserve cpu

FROM rust:1.95-slim-bookworm AS build
WORKDIR /build
# nasm builds libjpeg-turbo's SIMD (the mozjpeg crate): JPEG decoding and encoding 3-4x faster.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nasm=2.16.01-1 \
    && rm -rf /var/lib/apt/lists/*
# Dependencies first, against a stub crate: this layer is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY scripts/build-release.sh scripts/
RUN scripts/build-release.sh deps
COPY src src
COPY models/efficientnet_lite0.onnx models/
COPY deploy/overlays deploy/overlays
RUN scripts/build-release.sh app /opt/camserve cpu

FROM debian:bookworm-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="camserve" \
      org.opencontainers.image.description="Grad-CAM explanations for ONNX image classifiers, over HTTP (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deployment.md"
RUN groupadd --system --gid 10001 camserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin camserve
COPY --from=ort /opt/camserve/lib /opt/camserve/lib
COPY --from=build /opt/camserve /opt/camserve
ENV CAMSERVE_CONFIG=/opt/camserve/config/camserve.toml \
    CAMSERVE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
# No curl in the image: camserve probes itself (GET /readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/camserve/bin/camserve", "healthcheck"]
ENTRYPOINT ["/opt/camserve/bin/camserve"]
CMD ["serve"]
