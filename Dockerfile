# syntax=docker/dockerfile:1
# The lookalike image, used by the compose stack's worker and api services.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# An unprivileged account; the folders that become volumes are created here so that
# fresh named volumes inherit its ownership.
RUN useradd --create-home --uid 10001 lookalike \
    && mkdir -p /data /home/lookalike/.keras \
    && chown lookalike:lookalike /data /home/lookalike/.keras

WORKDIR /app

# The code is installed once, into site-packages, at the versions of constraints.txt. The
# sources are only mounted for this step (writable: the build writes its metadata next to
# them), so no second copy lands in the image; prefect.yaml names the flows by module path.
# The pip cache survives between builds, so a code change does not download TensorFlow again.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install -c /src/constraints.txt "/src[dask]"

# `prefect deploy --all` in the worker reads the deployments from the working directory.
COPY prefect.yaml ./

USER lookalike
EXPOSE 5000
CMD ["lookalike", "serve", "--host", "0.0.0.0", "--port", "5000"]
