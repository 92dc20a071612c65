"""LatentController: the latent controller as an `ImageTokenObserver` over a batch of requests.

After every sampled image token it keeps the token's hidden state in a per-image window. On
evaluation steps the condenser turns the window into memory tokens, the trigger compares them with
the prompt; images whose trigger fires (and that the guard rails allow) think, translate and shape
K control tokens, which the engine appends to exactly those images' KV caches.

State is per request index (the `images` of `begin_band`) and starts fresh at every band: a band is
drawn from a new prefill, and a redrawn band must not inherit the discarded attempt's history.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from twig_batch.controller.config import ControllerConfig
from twig_batch.controller.think import prompt_vector, think_ids, think_latent
from twig_batch.controller.trigger import TriggerState, trigger_fires
from twig_batch.controller.trigger_log import TriggerLog
from twig_batch.controller.weights import ControllerNet, build_controller_net
from twig_batch.engine.hooks import Injection
from twig_batch.engine.sampling import entropy


class _Band:
    """What one drawing call needs: the rows' images, their hidden-state window and guard-rail counters."""

    __slots__ = ("images", "band", "attempts", "window", "filled", "triggers", "injections", "last_injection")

    def __init__(self, images: list[int], band: int, attempts: list[int], config: ControllerConfig):
        self.images, self.band, self.attempts = images, band, attempts
        self.window: torch.Tensor | None = None  # [B, window, D], a ring buffer
        self.filled = 0
        self.triggers = [TriggerState(config.var_window) for _ in images]
        self.injections = [0] * len(images)
        self.last_injection: list[int | None] = [None] * len(images)


class LatentController:
    def __init__(self, bundle, prompts: list[str], config: ControllerConfig | None = None,
                 weights: ControllerNet | str | os.PathLike | None = None):
        self.bundle = bundle
        self.config = config or ControllerConfig()
        hidden_size = bundle.model.config.text_config.hidden_size
        if isinstance(weights, ControllerNet):
            if weights.hidden_size != hidden_size:
                raise ValueError(f"controller weights are for hidden size {weights.hidden_size}, model has {hidden_size}")
            self.net = weights.to(bundle.device, bundle.dtype)
        else:
            self.net = build_controller_net(hidden_size, self.config, bundle.device, bundle.dtype, weights)
        self.prompts = list(prompts)
        self.think_ids = [think_ids(bundle, p, self.config.think_tokens) for p in self.prompts]
        self.p_vecs = torch.stack([prompt_vector(bundle, p) for p in self.prompts]) if self.prompts else None
        self.logs = [TriggerLog() for _ in self.prompts]
        self._attempts: dict[tuple[int, int], int] = {}
        self._current: _Band | None = None

    # -- ImageTokenObserver ------------------------------------------------------------------------
    def begin_band(self, images: list[int], band: int) -> None:
        images = [int(i) for i in images]
        for image in images:
            if not 0 <= image < len(self.prompts):
                raise IndexError(f"image {image} is not one of this controller's {len(self.prompts)} requests")
        attempts = []
        for image in images:
            attempts.append(self._attempts.get((image, band), 0))
            self._attempts[(image, band)] = attempts[-1] + 1
        self._current = _Band(images, band, attempts, self.config)

    @torch.no_grad()
    def observe(self, step: int, hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> Injection | None:
        cfg = self.config
        if self._current is None:  # an engine that does not announce bands: rows are requests 0..B-1
            self.begin_band(list(range(hidden.shape[0])), 0)
        band = self._current
        if hidden.shape[0] != len(band.images):
            raise ValueError(f"observer got {hidden.shape[0]} rows for a band of {len(band.images)} images")
        self._remember(band, hidden)
        forced = [self._forced(step, image) for image in band.images]
        due = band.filled >= cfg.min_history and step % cfg.eval_every == 0
        evaluated = [due or f for f in forced]
        if not any(evaluated):
            return None
        memory, m_vec = self.net.condenser(band.window[:, : min(band.filled, cfg.window)])
        p_vec = self.p_vecs[band.images]
        s = F.cosine_similarity(m_vec.to(torch.float64), p_vec.to(torch.float64), dim=-1).cpu()
        u = entropy(logits).cpu()
        delta, var = torch.full_like(s, float("nan")), torch.full_like(s, float("nan"))
        for b, ev in enumerate(evaluated):
            if ev:
                delta[b], var[b] = band.triggers[b].update(float(s[b]))
        fired = trigger_fires(s, delta, var, u, cfg) | torch.tensor(forced)
        injected = torch.zeros(len(band.images), dtype=torch.bool)
        for b, image in enumerate(band.images):
            if not evaluated[b]:
                continue
            injected[b] = bool(fired[b]) and self._allowed(band, b, step)
            self.logs[image].add(band=band.band, attempt=band.attempts[b], step=step, s_t=float(s[b]),
                                 delta_s=float(delta[b]), var_s=float(var[b]), u_t=float(u[b]),
                                 fired=bool(fired[b]), forced=forced[b], injected=bool(injected[b]))
        if not injected.any():
            return None
        embeds = torch.zeros(len(band.images), cfg.control_tokens, hidden.shape[-1], dtype=self.bundle.dtype,
                             device=self.bundle.device)
        for b in injected.nonzero().flatten().tolist():
            embeds[b] = self._control_tokens(band.images[b], memory[b], m_vec[b], p_vec[b])
            band.injections[b] += 1
            band.last_injection[b] = step
        return Injection(embeds=embeds, rows=injected)

    def trigger_log(self, image: int) -> list[dict]:
        return [dict(r) for r in self.logs[image].records]

    # -- the rest ----------------------------------------------------------------------------------
    @property
    def max_control_slots(self) -> int:
        """The most cache positions one drawing call (one band) can add to an image."""
        return self.config.max_injections_per_band * self.config.control_tokens

    def summary(self, image: int) -> dict:
        return self.logs[image].summary()

    def end(self) -> None:
        """Drop the current band's window and counters (the logs stay)."""
        self._current = None

    def _remember(self, band: _Band, hidden: torch.Tensor) -> None:
        if band.window is None:
            band.window = hidden.new_zeros(hidden.shape[0], self.config.window, hidden.shape[-1])
        band.window[:, band.filled % self.config.window] = hidden
        band.filled += 1

    def _forced(self, step: int, image: int) -> bool:
        cfg = self.config
        return cfg.force_every > 0 and (step + 1) % cfg.force_every == 0 and (
            not cfg.force_images or image in cfg.force_images)

    def _allowed(self, band: _Band, b: int, step: int) -> bool:
        last = band.last_injection[b]
        return band.injections[b] < self.config.max_injections_per_band and (
            last is None or step - last >= self.config.min_gap)

    def _control_tokens(self, image: int, memory: torch.Tensor, m_vec: torch.Tensor, p_vec: torch.Tensor):
        """One image at a time, so an image's control tokens never depend on its batch."""
        ids = torch.tensor(self.think_ids[image], dtype=torch.long, device=self.bundle.device)
        z_vec = think_latent(self.bundle, self.bundle.embed_text(ids), memory)
        c_vec = self.net.translator(z_vec[None], m_vec[None], p_vec[None], self.config.max_scale)
        return self.net.shaper(c_vec)[0]
