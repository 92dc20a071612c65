"""LatentController: the latent controller as an `ImageTokenObserver` over a batch of requests.

After every sampled image token it keeps the token's hidden state in a per-image window. On
evaluation steps the condenser turns the window into memory tokens, the trigger compares them with
the prompt; images whose trigger fires (and that the guard rails allow) think, translate and shape
K control tokens, which the engine appends to exactly those images' KV caches.

State is per request index (the `images` of `begin_band`) and starts fresh at every band: a band is
drawn from a new prefill, and a redrawn band must not inherit the discarded attempt's history. Bands
drawn each on its own schedule (the mixed loop) are `watch`ed instead: `watches.py` keeps their state.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from twig_batch.settings import ControllerConfig
from twig_batch.controller.think import ThinkContext, prompt_vector, think_ids
from twig_batch.controller.trigger import TriggerHistory, fire_and_inject
from twig_batch.controller.trigger_log import TriggerLog
from twig_batch.controller.watches import NEVER, BandWatch, WatchPool
from twig_batch.controller.weights import ControllerNet, build_controller_net
from twig_batch.engine.hooks import Injection
from twig_batch.engine.fused import FastModel
from twig_batch.engine.sampling import entropy


class _Band:
    """What one drawing call needs: the rows' images, their hidden-state window, trigger history and
    guard-rail counters (all tensors on the model's device), and the evaluations not yet logged."""

    __slots__ = ("images", "band", "attempts", "window", "filled", "history", "injections", "last_injection",
                 "pending", "forced_rows", "think")

    def __init__(self, images: list[int], band: int, attempts: list[int], config: ControllerConfig, device):
        self.images, self.band, self.attempts = images, band, attempts
        self.window: torch.Tensor | None = None  # [B, window, D], a ring buffer
        self.filled = 0
        self.history = TriggerHistory(len(images), config.var_window, device)
        self.injections = torch.zeros(len(images), dtype=torch.long, device=device)
        self.last_injection = torch.full((len(images),), NEVER, dtype=torch.long, device=device)
        self.pending: list[tuple] = []  # (step, evaluated, s, delta, var, u, fired, forced, injected) per step
        forced = [not config.force_images or image in config.force_images for image in images]
        self.forced_rows = torch.tensor(forced, dtype=torch.bool, device=device)
        self.think: ThinkContext | None = None  # the images' think texts, run once at the band's first injection


class Decision:
    """One evaluation's verdict, still on the device. `resolve` reads it (the one wait for the device)
    and, when any image is injected, thinks and shapes their control tokens. An engine may start the
    next decode step before resolving and redo that step if an injection comes back."""

    def __init__(self, controller: "LatentController", band: _Band, injected: torch.Tensor, memory, m_vec, p_vec):
        self.controller, self.band, self.injected = controller, band, injected
        self.memory, self.m_vec, self.p_vec = memory, m_vec, p_vec
        self.any = injected.any()
        if injected.device.type == "cuda":  # copy the flag as soon as it exists; resolve waits for it only
            self.any = self.any.to("cpu", non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.ready = None

    def resolve(self) -> Injection | None:
        if self.ready is not None:
            self.ready.synchronize()
        if not bool(self.any):
            return None
        rows = self.injected.nonzero().flatten()
        controller, memory = self.controller, self.memory
        embeds = torch.zeros(len(self.band.images), controller.config.control_tokens, memory.shape[-1],
                             dtype=controller.bundle.dtype, device=controller.bundle.device)
        embeds[rows] = controller._control_tokens(self.band, rows, memory[rows], self.m_vec[rows],
                                                  self.p_vec[rows]).to(embeds.dtype)
        return Injection(embeds=embeds, rows=self.injected)


class LatentController:
    def __init__(self, bundle, prompts: list[str], config: ControllerConfig | None = None,
                 weights: ControllerNet | str | os.PathLike | None = None, model: FastModel | None = None):
        self.bundle = bundle
        # The engine's model (`Engine.model`: its joined projections and compiled kernels) runs the
        # thinks and the entropy; without one, the model as written.
        self.model = model or FastModel.plain(bundle.language_model)
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
        self._pool: WatchPool | None = None  # the bands drawn under a `watch`

    # -- ImageTokenObserver ------------------------------------------------------------------------
    def begin_band(self, images: list[int], band: int) -> None:
        band_state = self._open(images, band)
        self._log_pending()
        self._current = band_state

    def watch(self, image: int, band: int) -> BandWatch:
        """One image's drawing of `band`, watched on its own, beside any other image's at any band
        (the mixed loop's way: `BandWatch.observe_together` evaluates many at once)."""
        if self._pool is None:
            self._pool = WatchPool(self)
        return self._pool.open(int(image), band, self._attempts_of([image], band)[0])

    def _open(self, images: list[int], band: int) -> _Band:
        images = [int(i) for i in images]
        return _Band(images, band, self._attempts_of(images, band), self.config, self.bundle.device)

    def _attempts_of(self, images: list[int], band: int) -> list[int]:
        """How often each of `images` has drawn `band` before (now counted as drawing it once more)."""
        attempts = []
        for image in images:
            if not 0 <= image < len(self.prompts):
                raise IndexError(f"image {image} is not one of this controller's {len(self.prompts)} requests")
            attempts.append(self._attempts.get((image, band), 0))
            self._attempts[(image, band)] = attempts[-1] + 1
        return attempts

    @torch.no_grad()
    def observe(self, step: int, hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> Injection | None:
        decision = self.observe_deferred(step, hidden, logits, tokens)
        return None if decision is None else decision.resolve()

    @torch.no_grad()
    def observe_deferred(self, step: int, hidden: torch.Tensor, logits: torch.Tensor,
                         tokens: torch.Tensor) -> "Decision | None":
        """`observe` without waiting for the device: the trigger is evaluated and the guard rails are
        counted on the device; whether anyone is injected is read later, by `Decision.resolve`."""
        if self._current is None:  # an engine that does not announce bands: rows are requests 0..B-1
            self.begin_band(list(range(hidden.shape[0])), 0)
        return self._evaluate(self._current, step, hidden, logits, tokens)

    def _evaluate(self, band: _Band, step: int, hidden: torch.Tensor, logits: torch.Tensor,
                  tokens: torch.Tensor) -> "Decision | None":
        if hidden.shape[0] != len(band.images):
            raise ValueError(f"observer got {hidden.shape[0]} rows for a band of {len(band.images)} images")
        self._remember(band, hidden)
        force_now, due = self._due(band, step)
        if not (due or force_now):
            return None
        forced = band.forced_rows & force_now
        memory, m_vec, p_vec, injected = self._judge(band, step, forced, forced | due, logits)
        return Decision(self, band, injected, memory, m_vec, p_vec)

    def _due(self, band: _Band, step: int) -> tuple[bool, bool]:
        """(forced now, due for an evaluation) at `step`."""
        cfg = self.config
        return (cfg.force_every > 0 and (step + 1) % cfg.force_every == 0,
                band.filled >= cfg.min_history and step % cfg.eval_every == 0)

    def _judge(self, band: _Band, step: int, forced: torch.Tensor, evaluated: torch.Tensor,
               logits: torch.Tensor) -> tuple:
        """The trigger over the band's rows at `step`: its verdicts logged, its guard-rail counters
        moved on. Returns (memory, m_vec, p_vec, injected) over the rows."""
        cfg = self.config
        memory, m_vec = self.net.condenser(band.window[:, :min(band.filled, cfg.window)])
        p_vec = self.p_vecs[band.images]
        s = F.cosine_similarity(m_vec.to(torch.float64), p_vec.to(torch.float64), dim=-1)
        u = entropy(logits)
        delta, var = band.history.update(s, evaluated)
        fired, injected = fire_and_inject(s, delta, var, u, forced, evaluated, band.injections, band.last_injection,
                                          step, cfg)
        band.injections = band.injections + injected.long()
        band.last_injection = torch.where(injected, step, band.last_injection)
        band.pending.append((step, evaluated, s, delta, var, u, fired, forced, injected))
        return memory, m_vec, p_vec, injected

    def trigger_log(self, image: int) -> list[dict]:
        self._log_pending()
        return [dict(r) for r in self.logs[image].records]

    # -- the rest ----------------------------------------------------------------------------------
    @property
    def max_control_slots(self) -> int:
        """The most cache positions one drawing call (one band) can add to an image."""
        return self.config.max_injections_per_band * self.config.control_tokens

    def summary(self, image: int) -> dict:
        self._log_pending()
        return self.logs[image].summary()

    def end(self) -> None:
        """Drop the current band's window and counters (the logs stay)."""
        self._log_pending()
        self._current = None

    def _log_pending(self) -> None:
        """Move the evaluations not logged yet (the current band's, the watched bands') into the
        per-image logs: one transfer for many steps."""
        if self._pool is not None:
            self._pool.flush()
        band = self._current
        if band is None or not band.pending:
            return
        steps = [entry[0] for entry in band.pending]
        columns = [torch.stack([entry[i] for entry in band.pending]).cpu().tolist() for i in range(1, 9)]
        evaluated, s, delta, var, u, fired, forced, injected = columns
        for t, step in enumerate(steps):
            for b, image in enumerate(band.images):
                if evaluated[t][b]:
                    self.logs[image].add(band=band.band, attempt=band.attempts[b], step=step, s_t=s[t][b],
                                         delta_s=delta[t][b], var_s=var[t][b], u_t=u[t][b], fired=fired[t][b],
                                         forced=forced[t][b], injected=injected[t][b])
        band.pending.clear()

    def _remember(self, band: _Band, hidden: torch.Tensor) -> None:
        if band.window is None:
            band.window = hidden.new_zeros(hidden.shape[0], self.config.window, hidden.shape[-1])
        band.window[:, band.filled % self.config.window] = hidden
        band.filled += 1

    def _control_tokens(self, band: _Band, rows: torch.Tensor, memory: torch.Tensor, m_vec: torch.Tensor,
                        p_vec: torch.Tensor) -> torch.Tensor:
        """K control tokens [n, K, D] for the band's injected `rows`, their thinks run as one batch."""
        if band.think is None:
            texts = [self.bundle.embed_text(torch.tensor(self.think_ids[i], dtype=torch.long, device=self.bundle.device))
                     for i in band.images]
            band.think = ThinkContext(self.bundle, texts, self.config.memory_tokens, self.model)
        return self.shape_controls(band.think.latents(rows, memory), m_vec, p_vec)

    def shape_controls(self, z_vec: torch.Tensor, m_vec: torch.Tensor, p_vec: torch.Tensor) -> torch.Tensor:
        """K control tokens [n, K, D] from the thinks' latents, the windows' summaries and the prompts."""
        return self.net.shaper(self.net.translator(z_vec, m_vec, p_vec, self.config.max_scale))
