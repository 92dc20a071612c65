"""Every number of the latent controller, in one slotted dataclass validated once."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from twig_batch.errors import InputError, unknown_name


@dataclass(slots=True)
class ControllerConfig:
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
