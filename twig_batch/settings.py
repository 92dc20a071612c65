"""Generation settings: one slotted dataclass, validated once, shared by the CLI, the API and Ray."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from twig_batch.controller.config import ControllerConfig
from twig_batch.errors import InputError

MODES = ("plain", "twig", "seed")
KV_CACHES = ("model", "fp8")  # the image-token cache in the model's dtype, or fp8 (engine/fp8_kv.py)


@dataclass(slots=True)
class GenerationSettings:
    mode: str = "plain"
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    bands: int = 3
    reflect: bool = True
    theta: float = 90.0
    think_max_tokens: int = 512
    guidance_max_tokens: int = 300
    guidance_temperature: float = 1.0
    controller: ControllerConfig | None = None  # None: no latent controller
    kv_cache: str = "model"
    deterministic: bool = False  # the same bits every run on a GPU, at some speed (engine/repeatable.py)

    def __post_init__(self) -> None:
        if isinstance(self.controller, dict):  # settings that travelled as JSON (batch jobs, Ray actors)
            self.controller = ControllerConfig.from_dict(self.controller)
        if self.controller is not None and not isinstance(self.controller, ControllerConfig):
            raise InputError(f"controller must be a ControllerConfig, a dict of its fields or None, got "
                             f"{type(self.controller).__name__}")
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.kv_cache not in KV_CACHES:
            raise InputError(f"kv cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        # Values from `--set KEY=VALUE` or JSON may be text, NaN or floats: say so, rather than fail later.
        whole = ("bands", "think_max_tokens", "guidance_max_tokens") + (("top_k",) if self.top_k is not None else ())
        for name in whole:
            if not _whole(getattr(self, name)):
                raise InputError(f"{name.replace('_', ' ')} must be a whole number, got {getattr(self, name)!r}")
        if self.top_p is not None and not _finite(self.top_p):
            raise InputError(f"top-p must be a finite number, got {self.top_p!r}")
        for name in ("reflect", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not _finite(self.cfg_weight) or self.cfg_weight < 0:
            raise InputError(f"cfg weight must be a finite number >= 0, got {self.cfg_weight!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise InputError(f"top-p must lie in (0, 1], got {self.top_p}")
        if self.bands < 1:
            raise InputError(f"bands must be >= 1, got {self.bands}")
        if not _finite(self.theta) or not (0 <= self.theta <= 100):
            raise InputError(f"theta must lie in [0, 100], got {self.theta!r}")
        for name in ("think_max_tokens", "guidance_max_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")

    def check_geometry(self, token_rows: int) -> None:
        """Bands split the image's token rows evenly; call once the model (and its grid) is known."""
        if token_rows % self.bands:
            divisors = [k for k in range(1, token_rows + 1) if token_rows % k == 0]
            raise InputError(
                f"bands={self.bands} does not divide the image's {token_rows} token rows; use one of {divisors}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
