#!/usr/bin/env bash
# The release build, step by step: the Dockerfiles RUN these steps and CI runs them here (make image-root), so
# the image's steps are tested on machines without a Docker engine.
#
#   scripts/build-release.sh deps                 # compile the dependencies only (a stub crate; cached layer)
#   scripts/build-release.sh app  PREFIX VARIANT  # compile camserve; lay out bin/, models/, config/ under PREFIX
#   scripts/build-release.sh ort  PREFIX VARIANT  # ONNX Runtime's libraries from PyPI into PREFIX/lib
#
# VARIANT is cpu or cuda; the config baked in is deploy/overlays/{cpu,gpu}/camserve.toml, the one the
# Kubernetes overlays ship as a ConfigMap. Uses CARGO_TARGET_DIR (default: ./target) and python3 with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
export CARGO_TARGET_DIR=$target_dir

variant_config() {
  case $1 in
    cpu) echo deploy/overlays/cpu/camserve.toml ;;
    cuda) echo deploy/overlays/gpu/camserve.toml ;;
    *) echo "unknown variant \`$1\` (cpu or cuda)" >&2; exit 2 ;;
  esac
}

step=${1:?usage: $0 deps | app PREFIX VARIANT | ort PREFIX VARIANT}
case $step in
  deps)
    # The same manifest and lock file with an empty crate: the dependencies compile once and stay cached
    # (in the image's layer, in CI's target/) until Cargo.toml or Cargo.lock change. The stub has its own
    # name, so that its artefacts never pass for camserve's; the app step's --locked checks the lock file.
    stub=$(mktemp -d)
    trap 'rm -rf "$stub"' EXIT
    sed 's/^name = "camserve"$/name = "camserve-deps-stub"/' Cargo.toml > "$stub/Cargo.toml"
    grep -q '^name = "camserve-deps-stub"$' "$stub/Cargo.toml" || { echo "Cargo.toml has no name = \"camserve\" line" >&2; exit 1; }
    cp Cargo.lock "$stub/"
    mkdir "$stub/src"
    echo 'fn main() {}' > "$stub/src/main.rs"
    touch "$stub/src/lib.rs"
    cargo build --release --manifest-path "$stub/Cargo.toml"
    ;;
  app)
    prefix=${2:?PREFIX}; config=$(variant_config "${3:?VARIANT}")
    cargo build --release --locked --bin camserve
    install -D -m 0755 "$target_dir/release/camserve" "$prefix/bin/camserve"
    install -D -m 0644 models/efficientnet_lite0.onnx "$prefix/models/efficientnet_lite0.onnx"
    install -D -m 0644 "$config" "$prefix/config/camserve.toml"
    ;;
  ort)
    prefix=${2:?PREFIX}; variant=${3:?VARIANT}
    variant_config "$variant" > /dev/null
    wheel_dir=$(mktemp -d)
    trap 'rm -rf "$wheel_dir"' EXIT
    mkdir -p "$prefix/lib"
    if [[ $variant == cpu ]]; then
      python3 -m pip install --quiet --no-cache-dir --no-deps --target "$wheel_dir" "onnxruntime==$ORT_VERSION"
      install -m 0755 "$wheel_dir/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION" "$prefix/lib/"
    else
      # The extras bring CUDA 13, cuBLAS and cuDNN 9 as nvidia-* wheels: their libraries go to lib/cuda/,
      # which the image puts on LD_LIBRARY_PATH; the GPU driver itself comes from the host.
      python3 -m pip install --quiet --no-cache-dir --target "$wheel_dir" "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
      capi=$wheel_dir/onnxruntime/capi
      install -m 0755 "$capi/libonnxruntime.so.$ORT_VERSION" "$capi/libonnxruntime_providers_shared.so" \
        "$capi/libonnxruntime_providers_cuda.so" "$prefix/lib/"
      mkdir -p "$prefix/lib/cuda"
      find "$wheel_dir/nvidia" -name 'lib*.so*' -exec cp -a {} "$prefix/lib/cuda/" \;
    fi
    ;;
  *)
    echo "unknown step \`$step\`" >&2; exit 2 ;;
esac
