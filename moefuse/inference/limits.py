"""What one request to `moefuse serve` may hold and how requests are batched: `ServeLimits`, the server's config,
apart from the server so that `moefuse serve --help` can list the flags without importing the web stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moefuse.configutil import Config


@dataclass
class ServeLimits(Config):
    """What one request may hold, and how requests are batched (`moefuse serve --help` names the flags)."""

    config_key = "serve"

    max_upload_mb: float = 20.0
    """Largest request body (all fields and files together), MiB."""
    max_audio_seconds: float = 30.0
    """Longest audio clip, seconds."""
    max_image_pixels: int = 20_000_000
    """Largest image, width x height."""
    max_text_chars: int = 2000
    """Longest text or question, characters."""
    timeout_s: float = 30.0
    """A request not answered within this many seconds gets a 504."""
    max_batch_size: int = 32
    """Most requests the model runs together."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_queue: int = 256
    """Most requests waiting for the model; more get a 503."""
    max_connections: int = 64
    """Most requests served at once, each from when it has fully arrived to its answer (more get a 503; /health
    is not counted), and most connections waiting for their request (one more closes the one that has waited
    longest): with max_upload_mb it bounds the memory request bodies can hold (2 x 64 x 20 MiB by default)."""
    header_timeout_s: float = 5.0
    """A connection whose request headers are not complete this many seconds after it opened (or after its last
    answer) is closed."""
    decode_threads: int = 1
    """Threads that read media (images, audio) beside the model, per worker (more threads contend for one
    process's GIL: on the 2-core VM 1 served 11 % more requests than 2 at concurrency 32, benchmarks/serve_load.py)."""

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_audio_seconds", "timeout_s", "header_timeout_s", "max_wait_ms"):
            self.check(math.isfinite(getattr(self, name)), name, f"must be a finite number, got {getattr(self, name)}")
        for name in ("max_upload_mb", "max_audio_seconds", "timeout_s", "header_timeout_s"):
            self.check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("max_image_pixels", "max_text_chars", "max_batch_size", "max_queue", "max_connections",
                     "decode_threads"):
            self.check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        self.check(self.max_wait_ms >= 0, "max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)
