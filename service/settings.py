"""All service settings: environment variables with the ``SKIPDIT_`` prefix, checked at boot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kernels import dispatch
from model import cache, registry
from model.networks import lora
from service import request

SHIPPED_VIDEO = "digits-video-skip"
SHIPPED_TEXT = "digits-t2i-skip"
SHIPPED_TEXT_VIDEO = "digits-t2v-skip"


def default_models() -> list[str]:
    """What a deployment serves when neither SKIPDIT_MODELS nor SKIPDIT_MODEL is set: the shipped
    image model (the first: it serves requests that name no model), the shipped video model, the
    shipped text-to-image model and the shipped text-to-video model."""
    shipped = registry.shipped_models()
    also = [name for name in (SHIPPED_VIDEO, SHIPPED_TEXT, SHIPPED_TEXT_VIDEO) if name in shipped]
    return [registry.default_model(), *also]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKIPDIT_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    redis_url: str | None = Field(None, description="unset: embedded in-process queue")
    redis_prefix: str = "skipdit"
    redis_cluster: bool = Field(
        False, description="SKIPDIT_REDIS_URL names a node of a Redis Cluster (cluster client)"
    )
    run_worker: bool | None = Field(
        None, description="run the engine inside the API process; default: only without Redis"
    )

    models: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="models every worker loads, comma-separated or a JSON list; the first serves "
        "requests that name none; default: default_models(). After validation: always the list",
    )
    model: str | None = Field(None, description="one model: the single-model form of models")
    adapter_dirs: Annotated[list[Path], NoDecode] = Field(
        [],
        description="LoRA adapter directories (adapter.json + adapter.safetensors), "
        "comma-separated or a JSON list; each serves the served model its adapter.json names "
        "as base, under its name (requests: adapter)",
    )
    vae: str | None = None
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto", description="fused Triton kernels; auto: on CUDA, plain torch elsewhere"
    )
    graphs: Literal["auto", "cuda_graphs", "compile", "off"] = Field(
        "auto", description="captured steps per batch bucket; auto: on CUDA, off elsewhere"
    )
    fast_path_check: Literal["fall_back", "fail"] = Field(
        "fall_back",
        description="a fast-path component (kernels, graphs) that fails its start-up check "
        "against eager torch: fall_back turns it off for the worker and serves eagerly; fail "
        "stops the boot",
    )

    cache_defaults: dict[str, dict[str, Any]] = Field(
        {},
        description="served model -> the cache a request that names none runs, as a JSON "
        'object: {"policy": name, and its parameters by the policy\'s names}, e.g. '
        '{"digits-skip-dit": {"policy": "skip_cache", "interval": 3}}; a model left out: its '
        "card's default (shipped Skip-DiT models: Skip-Cache), else none",
    )
    max_batch_tokens: int = Field(4096, ge=1, description="batch rows x tokens per row, per step")
    prompt_cache_entries: int = Field(
        1024,
        ge=0,
        le=1_000_000,
        description="prompt embeddings a worker keeps (LRU, shared by its text models; the "
        "empty prompt is kept apart); each holds the encoder's output of one prompt (T5-XXL: "
        "up to 120 x 4096 floats); 0: every prompt is encoded again",
    )
    max_inflight: int = Field(32, ge=1, description="jobs one worker holds (running + waiting)")
    max_queue: int = Field(256, ge=1, description="jobs waiting per model before submits get 429")
    retry_after_s: float = Field(2.0, gt=0)
    max_num_images: int = Field(8, ge=1)
    max_steps: int = Field(250, ge=1)
    default_timeout_s: float = Field(300.0, gt=0)
    result_ttl_s: float = Field(3600.0, gt=0)
    job_ttl_s: float = Field(86400.0, gt=0)
    claim_idle_s: float = Field(30.0, gt=0, description="re-deliver work idle this long")
    heartbeat_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1, description="then the job goes to the dead-letter stream")
    drain_timeout_s: float = Field(60.0, ge=0, description="SIGTERM: finish running work this long")
    progress_interval_s: float = Field(
        0.25, ge=0, description="a job's step events at most this often (0: every step)"
    )
    poll_interval_s: float = Field(
        0.1,
        gt=0,
        description="while work runs, a worker asks the queue for new jobs and cancel flags "
        "this often: they wait up to this long; shorter costs CPU beside the model's",
    )
    cancel_on_disconnect: bool = Field(
        True,
        description="a synchronous request (POST /generate without async, POST "
        "/v1/images/generations) whose client disconnects cancels its job (queued: at once; "
        "running: at its next step once the worker sees the flag); false: the job runs on",
    )
    worker_name: str | None = None
    metrics_port: int | None = Field(None, ge=1, le=65535, description="worker /metrics port")
    log_level: str = "INFO"

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="bearer keys, comma-separated; unset (and no key file): the API is open"
    )
    api_keys_file: Path | None = Field(None, description="a file of bearer keys, one a line")
    key_rate_per_s: float = Field(5.0, gt=0, description="per key: sustained requests a second")
    key_burst: int = Field(20, ge=1, description="per key: requests allowed at once")
    key_max_queued: int = Field(16, ge=1, description="per key: jobs queued or running at once")
    metrics_need_key: bool = Field(
        False, description="with keys set, also require one for /metrics on the API port"
    )
    url_secret: SecretStr | None = Field(
        None,
        description="signs result URLs (response_format url), at least 32 characters; every API "
        "replica must share it. Unset: without Redis, a random secret per process (URLs die "
        "with it); with Redis, result URLs are off",
    )
    public_url: str | None = Field(
        None,
        description="the service's external base URL (behind a proxy), e.g. "
        "https://skipdit.example.com; result URLs start with it. Unset: the request's own",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="signs webhook deliveries (HMAC-SHA256, Standard Webhooks), at least 32 "
        "characters; whsec_<base64> is read as Standard Webhooks' base64 key. Every process "
        "that delivers must share it. Unset: requests with a webhook are refused (422)",
    )
    webhook_hosts: Annotated[list[str], NoDecode] = Field(
        [],
        description="hosts webhook URLs may name (exact, case-insensitive), comma-separated; "
        "empty: any host",
    )
    webhook_deliver: bool = Field(
        True, description="this process (API or worker) delivers due webhooks"
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="one delivery attempt: the receiver answers within this"
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="attempts per event; then it goes to the dead letters"
    )
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="retry n waits up to backoff * 2^(n-1) (full jitter)"
    )
    webhook_backoff_max_s: float = Field(600.0, gt=0, description="cap on one retry's wait")
    webhook_poll_s: float = Field(
        1.0, gt=0, description="a deliverer looks for due events this often"
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body must arrive within this; slower clients get 408"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"SKIPDIT_REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {self.redis_url!r}"
            )
        if self.heartbeat_s * 2 > self.claim_idle_s:
            raise ValueError(
                f"SKIPDIT_HEARTBEAT_S ({self.heartbeat_s}) must be at most half of "
                f"SKIPDIT_CLAIM_IDLE_S ({self.claim_idle_s}), or live workers lose their jobs"
            )
        if self.embedded_worker is False and self.redis_url is None:
            raise ValueError("SKIPDIT_RUN_WORKER=false needs SKIPDIT_REDIS_URL: no one would run")
        return self

    @model_validator(mode="after")
    def _urls(self) -> Settings:
        """Result URLs: a secret long enough to sign with; an absolute base URL."""
        if self.url_secret is not None and len(self.url_secret.get_secret_value()) < 32:
            raise ValueError("SKIPDIT_URL_SECRET must be at least 32 characters")
        if self.public_url is not None:
            if not self.public_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"SKIPDIT_PUBLIC_URL must start with http:// or https://, "
                    f"got {self.public_url!r}"
                )
            self.public_url = self.public_url.rstrip("/")
        return self

    @model_validator(mode="after")
    def _webhooks(self) -> Settings:
        if self.webhook_secret is not None and len(self.webhook_secret.get_secret_value()) < 32:
            raise ValueError("SKIPDIT_WEBHOOK_SECRET must be at least 32 characters")
        if self.webhook_backoff_s > self.webhook_backoff_max_s:
            raise ValueError(
                f"SKIPDIT_WEBHOOK_BACKOFF_S ({self.webhook_backoff_s}) must be at most "
                f"SKIPDIT_WEBHOOK_BACKOFF_MAX_S ({self.webhook_backoff_max_s})"
            )
        self.webhook_hosts = [host.lower() for host in self.webhook_hosts]
        return self

    @property
    def webhook_lease_s(self) -> float:
        """How long a claimed delivery stays its deliverer's: then another may take it (the
        deliverer died). Twice the attempt's timeout, plus a second."""
        return 2 * self.webhook_timeout_s + 1

    # model name -> adapter name -> its directory (``_adapters``, from adapter_dirs)
    _adapters: dict[str, dict[str, Path]] = PrivateAttr(default_factory=dict)

    @field_validator("models", "api_keys", "webhook_hosts", "adapter_dirs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """``a,b`` or ``["a", "b"]`` from the environment."""
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            return json.loads(value)
        return [name.strip() for name in value.split(",") if name.strip()]

    @model_validator(mode="after")
    def _served(self) -> Settings:
        """Resolve ``models``; every name must be a model the registry knows (read without
        weights), listed once."""
        if self.models is not None and self.model is not None and self.models != [self.model]:
            raise ValueError(
                f"SKIPDIT_MODEL ({self.model!r}) and SKIPDIT_MODELS ({self.models}) are both set: "
                "set one (SKIPDIT_MODEL is the single-model form)"
            )
        setting = "SKIPDIT_MODELS" if self.models is not None else "SKIPDIT_MODEL"
        names = self.models
        if names is None:
            names = [self.model] if self.model is not None else default_models()
        if not names:
            raise ValueError("SKIPDIT_MODELS is empty: name at least one model")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"SKIPDIT_MODELS names {twice} more than once")
        for name in names:
            try:
                registry.describe(name)
            except ValueError as e:  # FieldError (unknown: lists the known names), CheckpointError
                raise ValueError(f"{setting}: {getattr(e, 'message', e)}") from e
        self.models = names
        return self

    @model_validator(mode="after")
    def _adapter_dirs(self) -> Settings:
        """Each adapter directory holds an adapter of a served model, one name per model."""
        adapters: dict[str, dict[str, Path]] = {}
        for directory in self.adapter_dirs:
            try:
                meta = lora.read_meta(directory)
            except ValueError as e:  # AdapterError, or adapter.json is no JSON
                raise ValueError(f"SKIPDIT_ADAPTER_DIRS: {e}") from e
            name, base = str(meta["name"]), str(meta["base"])
            if base not in (self.models or []):
                raise ValueError(
                    f"SKIPDIT_ADAPTER_DIRS: {directory} adapts {base!r}, not a served model; "
                    f"served: {self.models}"
                )
            if name in adapters.get(base, {}):
                raise ValueError(f"SKIPDIT_ADAPTER_DIRS: two adapters of {base!r} named {name!r}")
            adapters.setdefault(base, {})[name] = directory
        self._adapters = adapters
        return self

    def adapters_of(self, model: str) -> dict[str, Path]:
        """The adapters served with ``model``: name -> directory."""
        return dict(self._adapters.get(model, {}))

    @model_validator(mode="after")
    def _cache_defaults(self) -> Settings:
        """Every default names a served model, a policy, and parameters that policy takes on
        it: a bad default stops the boot, not each request."""
        for name, default in self.cache_defaults.items():
            where = f"SKIPDIT_CACHE_DEFAULTS[{name!r}]"
            if name not in (self.models or []):
                raise ValueError(f"{where}: not a served model; served: {self.models}")
            if default.get("policy") not in cache.POLICIES:
                raise ValueError(
                    f"{where}: policy must be one of {sorted(cache.POLICIES)}, "
                    f"got {default.get('policy')!r}"
                )
            try:
                request.default_config(registry.describe(name), self)
            except (TypeError, ValueError) as e:  # unknown parameter, FieldError
                raise ValueError(f"{where}: {e}") from e
        return self

    @model_validator(mode="after")
    def _runnable(self) -> Settings:
        """An explicitly asked fast path that cannot run on this device stops the boot."""
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"SKIPDIT_DEVICE: {e}") from e
        if self.kernels == "triton":
            reason = dispatch.triton_missing_reason(device)
            if reason is not None:
                raise ValueError(f"SKIPDIT_KERNELS=triton cannot run: {reason}")
        if self.graphs == "cuda_graphs" and device.type != "cuda":
            raise ValueError(f"SKIPDIT_GRAPHS=cuda_graphs needs a CUDA device, got {device}")
        return self

    @model_validator(mode="after")
    def _keys(self) -> Settings:
        """Read SKIPDIT_API_KEYS_FILE into ``api_keys`` (blank lines and # comments skipped)."""
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"SKIPDIT_API_KEYS_FILE: cannot read: {e}") from e
            keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            self.api_keys = [*self.api_keys, *map(SecretStr, keys)]
        short = [i for i, k in enumerate(self.api_keys) if len(k.get_secret_value()) < 16]
        if short:
            raise ValueError(f"SKIPDIT_API_KEYS: key #{short[0] + 1} is shorter than 16 characters")
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def embedded_worker(self) -> bool:
        return self.run_worker if self.run_worker is not None else self.redis_url is None
