"""ServerConfig: the HTTP side's options (the engine's are in ``EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUED_REQUESTS = 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the model argument as given
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1 routes
    max_queued_requests: int | None = DEFAULT_MAX_QUEUED_REQUESTS  # None: unbounded
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers at all
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_level: str = "info"
    log_prompts: bool = False
    log_stats_interval_s: float = 10.0  # 0 disables the periodic stats line
    health_stall_s: float = 300.0  # /health fails when the engine loop has not turned for this long
    tool_call_parser: str = "auto"  # how tool calls are written: "auto" (from the chat template) or a parser name

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.log_stats_interval_s < 0:
            raise ValueError(f"log_stats_interval_s must be >= 0, got {self.log_stats_interval_s}")
        if self.health_stall_s <= 0:
            raise ValueError(f"health_stall_s must be > 0, got {self.health_stall_s}")
