"""Service settings from `ICD_*` environment variables, with an embedded default for each.

With no configuration everything lives under one folder (`ICD_HOME`, default `./.icd`): a SQLite
database, a SQLite-backed broker (Kombu's SQLAlchemy transport) and the artifact folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_LEASE_S = 20.0  # ICD_LEASE_TIMEOUT_S's default, and the lease of a claim that names none


class Settings(BaseSettings):
    """One object for every knob of the API, the store and the workers."""

    model_config = SettingsConfigDict(env_prefix="ICD_", extra="ignore")

    home: Path = Path(".icd")
    database_url: str = ""
    broker_url: str = ""
    # Unset: <home>/artifacts and <home>/cache (see _folders_under_home); absolute Paths once validated.
    artifact_root: Path = Path(".icd") / "artifacts"
    cache_dir: Path = Path(".icd") / "cache"
    # Colon-separated in the environment; relative dataset paths in specs are resolved against these.
    data_roots: Annotated[list[Path], NoDecode] = []
    api_token: str | None = None  # legacy single shared token (an admin); prefer `icd token create`
    # Where the API listens (`icd serve --host` sets it): beyond loopback, tokens and ICD_DATA_ROOTS are required.
    listen_host: str = "127.0.0.1"
    require_token: bool = False  # ask for a token on loopback too
    # Submit-time caps, so one request cannot take a GPU machine for itself.
    max_batch_size: int = 64
    max_image_size: int = 2048  # data.min_size / max_size and generated image_size, in pixels
    max_dataset_images: int = 100_000  # generated (shapes) datasets
    max_iterations: int = 10_000_000
    max_body_bytes: int = 1_000_000  # request bodies larger than this get 413 before they are read
    worker_heartbeat_s: float = 5.0  # also renews the running job's lease: 4 beats per lease timeout
    redeliver_after_s: float = 30.0  # an idle worker re-sends a job left 'queued' this long (lost message)
    # A running job's lease: renewed by its worker's heartbeat, reaped (job re-queued) once this stale.
    lease_timeout_s: float = DEFAULT_LEASE_S
    reaper_interval_s: float = 2.0  # how often the API and every worker look for expired leases
    max_attempts: int = 3  # attempts a job gets when a worker is lost (a spec's `max_attempts` wins)
    # Preemption (docs/scheduling.md): a queued job of higher priority may stop a running one at its next
    # step (checkpointed, re-queued, resumed exactly), once that one has run this long (no thrashing).
    preemption: bool = True
    preempt_min_run_s: float = Field(60.0, ge=0)
    # A queued job that no live worker can take (e.g. device: cuda, no GPU worker) fails after this long.
    unservable_timeout_s: float = 600.0
    # Redis re-delivers an unacknowledged message after this long; None: lease_timeout_s + 30 s. The
    # lease, not the broker, guards against double runs, so a redelivery of a running job is a no-op.
    redis_visibility_timeout_s: float | None = None
    # Devices a worker owns for one data-parallel job (resources.gpus). Unset: the GPUs it sees. On a
    # CPU worker, N > 1 lets it run N-process gloo groups (tests, laptops): it then consumes *-g2..*-gN.
    worker_gpus: int | None = Field(None, ge=1, le=64)
    # torch intra-op threads of each worker process (`--threads` wins). Unset: OMP_NUM_THREADS if set,
    # else the cores this process may use shared among the host's workers (see worker.threads).
    worker_threads: int | None = Field(None, ge=1, le=1024)
    ddp_timeout_s: float = Field(300.0, gt=0)  # a rank's collective waits this long for a lost peer
    ddp_stop_grace_s: float = Field(120.0, gt=0)  # after asking a group to stop, kill it after this long
    # The embedded `icd serve` migrates its own database; a production API refuses an old schema.
    auto_migrate: bool = False

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p for p in v.split(":") if p]
        return v

    @model_validator(mode="before")
    @classmethod
    def _folders_under_home(cls, data: Any) -> Any:
        """An unset artifact_root / cache_dir lives under `home`, wherever home is."""
        if isinstance(data, dict):
            home = Path(data.get("home") or ".icd")
            for key, folder in (("artifact_root", "artifacts"), ("cache_dir", "cache")):
                if not data.get(key):
                    data = {**data, key: home / folder}
        return data

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        # Absolute paths so the sqlite URLs and artifact paths do not depend on a later chdir.
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'icd.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        self.artifact_root = self.artifact_root.expanduser().resolve()
        self.cache_dir = self.cache_dir.expanduser().resolve()
        return self

    @property
    def visibility_timeout_s(self) -> float:
        return self.redis_visibility_timeout_s or self.lease_timeout_s + 30.0

    @property
    def api_token_required(self) -> bool:
        return bool(self.api_token)

    @property
    def beyond_loopback(self) -> bool:
        """True when the API listens on an address other machines can reach."""
        return not is_loopback(self.listen_host)

    @property
    def auth_required(self) -> bool:
        """Anonymous requests are refused (401). On loopback with no ICD_API_TOKEN and no ICD_REQUIRE_TOKEN,
        anonymous callers are the local admin (the zero-setup embedded default)."""
        return self.beyond_loopback or self.require_token or bool(self.api_token)

    def allowed_data_roots(self) -> list[Path]:
        """ICD_DATA_ROOTS, or (embedded default, loopback only) the working folder and the cache."""
        if self.data_roots:
            return [Path(r) for r in self.data_roots]
        return [Path.cwd(), self.cache_dir]

    def ensure_dirs(self) -> None:
        """Create the local folders the embedded mode writes to."""
        for d in (self.home, self.artifact_root, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, a LAN address, a name) is reachable."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (tests build their own `Settings(...)` instead of using this)."""
    return Settings()
