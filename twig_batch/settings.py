"""Generation settings: slotted dataclasses, validated once, built at the edge (the CLI, the API) and
handed down as they are, to Ray actors too (they pickle).

`GenerationSettings` holds what every mode reads; its `controller` is the latent controller's own
`ControllerConfig` (None: no controller). Nothing here imports the layers that use them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from twig_batch.errors import InputError, unknown_name

MODES = ("plain", "twig", "seed")
KV_CACHES = ("model", "fp8")  # the image-token cache in the model's dtype, or fp8 (engine/fp8_kv.py)
# How a call's images are run: "lockstep" (every image of a part through each phase together,
# pipeline/staged.py), "mixed" (each image through its stages on its own, pipeline/mixed.py), or
# "auto" (`GenerationSettings.runs_mixed`).
LOOPS = ("auto", "lockstep", "mixed")


@dataclass(slots=True)
class ControllerConfig:
    """Every number of the latent controller (docs/controller.md)."""

    # Condenser: M learnable queries over the hidden states of the last `window` image tokens.
    memory_tokens: int = 8
    window: int = 32
    attention_heads: int = 8
    # Shaper: control tokens appended to the KV cache per injection.
    control_tokens: int = 4
    # Trigger: fire on (ds < -tau_drop and var > tau_var) or (u > tau_entropy and s < tau_sim).
    tau_drop: float = 0.05
    tau_var: float = 0.002
    tau_entropy: float = 3.5
    tau_sim: float = 0.25
    var_window: int = 16  # evaluations the variance of s is taken over
    # Think: the last N tokens of the clean user prompt.
    think_tokens: int = 64
    # Translator: the control vector's gate is scaled into [0, max_scale].
    max_scale: float = 1.0
    # Weights: a safetensors file, or a deterministic initialisation from init_seed.
    weights: str | None = None
    init_seed: int = 0
    init_std: float = 0.02
    # Guard rails.
    min_history: int = 8  # image tokens a band must have drawn before the first evaluation
    eval_every: int = 1  # evaluate at global steps divisible by this
    max_injections_per_band: int = 4
    min_gap: int = 32  # steps between two injections into the same image
    # Forced fires, for tests and benchmarks: fire after every `force_every`-th step (0 = never),
    # for the listed request indices only (empty = all). Guard rails still apply.
    force_every: int = 0
    force_images: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        positive = ("memory_tokens", "window", "attention_heads", "control_tokens", "var_window", "think_tokens",
                    "eval_every", "max_injections_per_band")
        for name in positive:
            _check_int(name, getattr(self, name), 1)
        for name in ("min_history", "min_gap", "force_every", "init_seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("tau_drop", "tau_var", "tau_entropy", "tau_sim", "max_scale", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise InputError(f"controller {name} must be a number, got {value!r}")
        for name in ("tau_var", "max_scale", "init_std"):
            if getattr(self, name) < 0:
                raise InputError(f"controller {name} must be >= 0, got {getattr(self, name)}")
        if self.min_history > self.window:
            raise InputError(f"controller min_history ({self.min_history}) cannot exceed window ({self.window})")
        self.force_images = tuple(self.force_images)
        for image in self.force_images:
            _check_int("force_images entry", image, 0)
        if self.weights is not None:
            self.weights = str(self.weights)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ControllerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown controller setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def with_overrides(self, pairs: list[str]) -> ControllerConfig:
        """Apply `name=value` strings (from the command line), typed after the existing field."""
        values = self.to_dict()
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep:
                raise InputError(f"controller setting {pair!r} is not name=value")
            if name not in values:
                raise unknown_name("controller setting", name, values)
            values[name] = _parse_like(values[name], text.strip(), name)
        return ControllerConfig.from_dict(values)


@dataclass(slots=True)
class GenerationSettings:
    """What every image of a call shares. Bands that fit the image's token rows are the band
    schedule's to check (`pipeline/bands.py`): the rows are known only with the model."""

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
    loop: str = "auto"

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
        if self.loop not in LOOPS:
            raise InputError(f"loop must be one of {', '.join(LOOPS)}, got {self.loop!r}")
        if self.loop == "mixed" and (self.kv_cache != "model" or self.deterministic):
            raise InputError("loop=mixed runs the KV cache in the model's dtype and without --deterministic (its "
                             "kernels were not checked to repeat their bits); use loop=lockstep or loop=auto")
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

    def runs_mixed(self, on_gpu: bool) -> bool:
        """Whether the mixed loop runs these settings' calls. `auto` picks it where it was measured
        faster than the lockstep engine, twig on a GPU (benchmarks/README.md; on a CPU the tiny model's
        steps cost their host work, which the mixed loop has more of), and where it has every feature
        asked for (a cache in the model's dtype, no `deterministic`)."""
        if self.loop != "auto":
            return self.loop == "mixed"
        return on_gpu and self.mode == "twig" and self.kv_cache == "model" and not self.deterministic

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GenerationSettings:
        """Settings given by name (`--set`, JSON, a Python dict); an unknown name lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in values:
            if name not in known:  # the mode is left out of the list: it has a flag of its own
                raise unknown_name("generation setting", name, known - {"mode"})
        return cls(**values)


def parse_pairs(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings -> settings; values are read as JSON when they parse (3, 4.5, true, null)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"a setting is KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = json.loads(value)
        except ValueError:
            values[key.strip()] = value
    return values


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"controller {name} must be an integer >= {minimum}, got {value!r}")


def _parse_like(current, text: str, name: str):
    try:
        if name == "weights":
            return None if text.lower() in ("", "none") else text
        if name == "force_images":
            return tuple(int(x) for x in text.split(",") if x.strip())
        if isinstance(current, bool):
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(text)
        return float(text)
    except ValueError:
        raise InputError(f"controller {name} cannot be {text!r}") from None
