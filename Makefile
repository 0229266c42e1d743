# imagemesh: `make run` sets up and starts the mesh, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= ./models
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/imagemesh/v1/*.proto)
GENERATED := gen/.generated

export MODEL_DIR

.PHONY: setup protos run test models clean

setup: $(INSTALLED) $(GENERATED)

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
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

models: setup
	$(PY) -m services.fetch_models --dir "$(MODEL_DIR)"

clean:
	rm -rf gen $(VENV) .pytest_cache
