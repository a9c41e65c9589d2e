"""Worker settings, from `CONSERVE_*` environment variables (command-line flags override them). The database
URL and internal token are the gateway's own settings: both sides must agree on them."""
from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from app.settings import default_database_url


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONSERVE_", extra="ignore")

    database_url: str = default_database_url()
    internal_token: str | None = None
    worker_id: str | None = None          # default: <hostname>-<device>-<port>
    worker_host: str = "127.0.0.1"        # interface the internal endpoint listens on
    worker_port: int = 0                  # 0: any free port
    worker_url: str | None = None         # how the gateway reaches this worker (default http://host:port)
    heartbeat_interval_s: float = 2.0
    # Offline jobs: the Celery broker, how many shards this worker runs at once, the shard lease in the job
    # store (renewed every third of it; a dead worker's shards are re-sent once it lapses) and the broker's
    # visibility timeout (a shard is handed back after a quarter of it). The gateway must use the same.
    broker_url: str = "redis://127.0.0.1:6379/0"
    offline_slots: int = 2
    shard_lease_s: float = 30.0
    broker_visibility_timeout_s: float = 600.0
    sample_retention_s: float = 3600.0
    # The engine (engine/config.py documents each).
    model: str | None = None              # HF directory or .gguf file; None: the bundled SmolLM2-135M-Instruct
    served_model_name: str | None = None  # the name clients ask for (default: the model's own name)
    device: str | None = None             # cpu, cuda, cuda:N (default: CUDA when present)
    dtype: str = "auto"                   # bfloat16 where the device computes it natively, else float32
    policy: str = "conserve"
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    kv_cache_bytes: int | None = None
    checkpoint_bytes: int | None = None   # host KV checkpoint store (default: twice the KV cache, <= 40% of RAM over the GPUs seen)
    decode_mirror_bytes: int | None = None  # CPU decode mirror cap (default: twice the KV cache, <= 20% of RAM,
                                            # where the native decode kernel is off; 0: off)
    decode_graphs: str = "auto"           # decode steps from CUDA graphs: auto (on CUDA), on, off
    native_decode: str = "auto"           # compiled decode attention and row ops: auto (CPU, where they build), on, off
    max_num_seqs: int = 128
    max_model_len: int | None = None
    profile_seconds: float = 5.0          # step-latency profiling at first start (then cached per model/device)
    profile_cache_dir: str | None = None  # default ~/.cache/conserve/profiles
