"""The latent controller over images that each draw their bands on their own schedule (the mixed loop).

Every band being drawn under a watch holds a slot of one pool: its hidden-state window, trigger
history and guard-rail counters are rows of pool-wide tensors, so one step's evaluation of any number
of images, each at its own step of its own band, is one set of tensor operations per window length
(all images past their first `window` tokens share one). The arithmetic is `LatentController._judge`'s,
row for row (`trigger.fire_and_inject`). Evaluations are copied to the host as they are made, without
waiting, and moved into the per-image logs when a log is asked for; verdicts are read by
`Verdicts.injected`, which an engine may call once the next step is queued, and the injected
watches' control tokens made by `Verdicts.control_tokens`, for the verdicts of one step or of several.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twig_batch.controller.think import ThinkContext
from twig_batch.controller.trigger import TriggerHistory, fire_and_inject
from twig_batch.engine.sampling import entropy
from twig_batch.engine.transfer import HostCopy, to_device

NEVER = -(2 ** 40)  # "no injection yet": any step minus this clears every gap


class WatchPool:
    """The state of every watched band of one controller, a slot per band; slots are reused once a
    band is closed (what its evaluations logged is kept apart from the slot)."""

    def __init__(self, controller):
        self.controller = controller
        self.capacity = 0
        self.free: list[int] = []
        self.filled: list[int] = []  # image tokens each slot's band has drawn (host: it decides the timing)
        self.fresh: list[int] = []  # slots opened since the last evaluation, their device state not reset yet
        self.window = self.previous = self.ring = self.count = self.injections = self.last_injection = None
        self.pending: list[tuple] = []  # (identities, steps, values [8, n] on their way to the host) per group

    def open(self, image: int, band: int, attempt: int) -> "BandWatch":
        if not self.free:
            self._grow()
        slot = self.free.pop()
        self.filled[slot] = 0
        self.fresh.append(slot)
        return BandWatch(self, slot, image, band, attempt)

    def _grow(self) -> None:
        old, cfg, bundle = self.capacity, self.controller.config, self.controller.bundle
        size = max(64, 2 * old)
        hidden_size, device = bundle.model.config.text_config.hidden_size, bundle.device

        def grown(tensor: torch.Tensor | None, shape: tuple, dtype) -> torch.Tensor:
            new = torch.zeros((size, *shape), dtype=dtype, device=device)
            if tensor is not None:
                new[:old] = tensor
            return new

        self.window = grown(self.window, (cfg.window, hidden_size), bundle.dtype)
        self.previous = grown(self.previous, (), torch.float64)
        self.ring = grown(self.ring, (cfg.var_window,), torch.float64)
        self.count = grown(self.count, (), torch.long)
        self.injections = grown(self.injections, (), torch.long)
        self.last_injection = grown(self.last_injection, (), torch.long)
        self.filled += [0] * (size - old)
        self.free += list(range(size - 1, old - 1, -1))  # popped from the end: the lowest slot first
        self.capacity = size

    @torch.no_grad()
    def evaluate(self, watches: list["BandWatch"], steps: list[int], hidden: torch.Tensor,
                 logits: torch.Tensor) -> "Verdicts":
        """Each watch's evaluation of its image's token at `steps[i]` (row i of `hidden` [B, D] and
        `logits` [B, V]), every host value the step needs in one copy to the device."""
        cfg = self.controller.config
        slots = [watch.slot for watch in watches]
        places = [self.filled[slot] % cfg.window for slot in slots]
        timing = []
        for watch, slot, step in zip(watches, slots, steps):
            self.filled[slot] += 1
            timing.append((cfg.force_every > 0 and (step + 1) % cfg.force_every == 0,
                           self.filled[slot] >= cfg.min_history and step % cfg.eval_every == 0))
        groups: dict[int, list[int]] = {}  # window length -> the watches evaluated with it
        for i, slot in enumerate(slots):
            if any(timing[i]):
                groups.setdefault(min(self.filled[slot], cfg.window), []).append(i)
        fresh, self.fresh = self.fresh, []
        values = slots + places + fresh
        for members in groups.values():
            forced = [timing[i][0] and watches[i].forceable for i in members]
            values += members + [slots[i] for i in members] + [watches[i].image for i in members] + forced
            values += [f or timing[i][1] for f, i in zip(forced, members)] + [steps[i] for i in members]
        staged = to_device(values, torch.long, hidden.device)
        n, f = len(slots), len(fresh)
        if f:
            self._reset(staged[2 * n:2 * n + f])
        self.window[staged[:n], staged[n:2 * n]] = hidden.to(self.window.dtype)
        verdicts, first = Verdicts(self.controller, watches), 2 * n + f
        for fill, members in groups.items():
            columns = staged[first:first + 6 * len(members)].view(6, len(members))
            first += columns.numel()
            verdicts.groups.append((members, *self._judge(watches, members, steps, fill, columns, logits)))
        verdicts.read_flags()
        return verdicts

    def _reset(self, slots: torch.Tensor) -> None:
        # index_fill_ takes its value on the host; an indexed assignment of a number would wait for the device
        self.previous.index_fill_(0, slots, math.nan)
        self.ring.index_fill_(0, slots, 0.0)
        self.count.index_fill_(0, slots, 0)
        self.injections.index_fill_(0, slots, 0)
        self.last_injection.index_fill_(0, slots, NEVER)

    def _judge(self, watches, members: list[int], steps: list[int], fill: int, columns: torch.Tensor,
               logits: torch.Tensor) -> tuple:
        """The trigger over `members` (watches whose windows hold `fill` states); `columns`: their
        indices, slots, images, forced and evaluated flags and steps on the device. Returns (injected,
        memory, m_vec, p_vec) over them."""
        controller, cfg = self.controller, self.controller.config
        index, slots, images, forced, evaluated, step = columns
        forced, evaluated = forced.bool(), evaluated.bool()
        memory, m_vec = controller.net.condenser(self.window[slots, :fill])
        p_vec = controller.p_vecs[images]
        s = F.cosine_similarity(m_vec.to(torch.float64), p_vec.to(torch.float64), dim=-1)
        u = entropy(logits[index])
        history = TriggerHistory.of(self.previous[slots], self.ring[slots], self.count[slots])
        delta, var = history.update(s, evaluated)
        self.previous[slots], self.ring[slots], self.count[slots] = history.previous, history.ring, history.count
        injections, last_injection = self.injections[slots], self.last_injection[slots]
        fired, injected = fire_and_inject(s, delta, var, u, forced, evaluated, injections, last_injection, step, cfg)
        self.injections[slots] = injections + injected.long()
        self.last_injection[slots] = torch.where(injected, step, last_injection)
        logged = torch.stack([t.to(torch.float64) for t in (evaluated, s, delta, var, u, fired, forced, injected)])
        self.pending.append(([watches[i].identity for i in members], [steps[i] for i in members], HostCopy(logged)))
        return injected, memory, m_vec, p_vec

    def flush(self) -> None:
        """Moves every evaluation made so far into the per-image logs (each on its way to the host since
        it was made: no wait for what was queued after it)."""
        if not self.pending:
            return
        identities = [identity for entry in self.pending for identity in entry[0]]
        steps = [step for entry in self.pending for step in entry[1]]
        values = torch.cat([entry[2].values() for entry in self.pending], dim=1).tolist()
        self.pending.clear()
        evaluated, s, delta, var, u, fired, forced, injected = values
        logs = self.controller.logs
        for j, ((image, band, attempt), step) in enumerate(zip(identities, steps)):
            if evaluated[j]:
                logs[image].add(band=band, attempt=attempt, step=step, s_t=s[j], delta_s=delta[j], var_s=var[j],
                                u_t=u[j], fired=bool(fired[j]), forced=bool(forced[j]), injected=bool(injected[j]))


class BandWatch:
    """One image's band under the controller (`LatentController.watch`): `observe_together` evaluates
    many images' tokens, each at its own band and step; `close` when the band is drawn."""

    def __init__(self, pool: WatchPool, slot: int, image: int, band: int, attempt: int):
        self.pool, self.slot = pool, slot
        self.identity = (image, band, attempt)
        config = pool.controller.config
        self.forceable = not config.force_images or image in config.force_images
        self.think: tuple[ThinkContext, int] | None = None  # its think text's context and row, at its first injection

    @property
    def image(self) -> int:
        return self.identity[0]

    @property
    def max_control_slots(self) -> int:
        return self.pool.controller.max_control_slots

    @staticmethod
    @torch.no_grad()
    def observe_together(watches: list["BandWatch"], steps: list[int], hidden: torch.Tensor,
                         logits: torch.Tensor) -> "Verdicts":
        """Every watch's verdict on its image's token at `steps[i]` (row i of `hidden`, `logits`),
        evaluated as one batch and still on the device. The watches are one controller's (a call's
        images share one)."""
        pool = watches[0].pool
        if any(watch.pool is not pool for watch in watches):
            raise ValueError("watches of different controllers were observed together; a call's images share one")
        return pool.evaluate(watches, steps, hidden, logits)

    def close(self) -> None:
        self.pool.free.append(self.slot)


class Pick:
    """One injected watch of a `Verdicts`: its index there, and its group and row in the group."""

    def __init__(self, verdicts: "Verdicts", index: int, group: int, row: int):
        self.verdicts, self.index, self.group, self.row = verdicts, index, group, row

    @property
    def watch(self) -> BandWatch:
        return self.verdicts.watches[self.index]


class Verdicts:
    """One step's evaluations of many watches (`WatchPool.evaluate`), still on the device."""

    def __init__(self, controller, watches: list[BandWatch]):
        self.controller, self.watches = controller, watches
        self.groups: list[tuple] = []  # (watch indices, injected, memory, m_vec, p_vec)
        self.flags: HostCopy | None = None  # every group's injected flags, on their way to the host

    def read_flags(self) -> None:
        """Starts the injected flags' copy to the host (once every group is judged), so that
        `injected` waits for the evaluation alone, not for whatever the engine queued after it."""
        if self.groups:
            self.flags = HostCopy(torch.cat([group[1] for group in self.groups]))

    def injected(self, wanted: list[bool] | None = None) -> list[Pick]:
        """The watches injected: one wait, for the flags' copy alone. A watch not `wanted` (its band is
        over: nothing would read its tokens) is left out."""
        if self.flags is None:
            return []
        flags = self.flags.values().tolist()
        picks, first = [], 0
        for g, (members, *_) in enumerate(self.groups):
            for j, index in enumerate(members):
                if flags[first + j] and (wanted is None or wanted[index]):
                    picks.append(Pick(self, index, g, j))
            first += len(members)
        return picks

    @staticmethod
    @torch.no_grad()
    def control_tokens(picks: list[Pick]) -> torch.Tensor:
        """Control tokens [len(picks), K, D] for injected watches of one controller, from any number of
        steps' verdicts: their thinks run as one batch (a watch's first think opens its text's context)."""
        controller = picks[0].verdicts.controller
        if any(pick.verdicts.controller is not controller for pick in picks):
            raise ValueError("control tokens were asked for watches of different controllers; a call's images "
                             "share one")
        bundle, device = controller.bundle, controller.bundle.device
        watches = [pick.watch for pick in picks]
        new = [watch for watch in dict.fromkeys(watches) if watch.think is None]
        if new:  # one context over every watch thinking for the first time
            texts = [bundle.embed_text(to_device(controller.think_ids[watch.image], torch.long, device))
                     for watch in new]
            context = ThinkContext(bundle, texts, controller.config.memory_tokens, controller.model)
            for row, watch in enumerate(new):
                watch.think = (context, row)
        # Each group's rows are gathered once; `order` puts the gathered rows back in the picks' order.
        by_group: dict[tuple[int, int], list[int]] = {}
        for i, pick in enumerate(picks):
            by_group.setdefault((id(pick.verdicts), pick.group), []).append(i)
        memory, m_vec, p_vec, order = [], [], [], []
        for members in by_group.values():
            first = picks[members[0]]
            _, _, group_memory, group_m, group_p = first.verdicts.groups[first.group]
            rows = to_device([picks[i].row for i in members], torch.long, device)
            memory.append(group_memory[rows])
            m_vec.append(group_m[rows])
            p_vec.append(group_p[rows])
            order += members
        back = to_device(sorted(range(len(order)), key=order.__getitem__), torch.long, device)
        memory, m_vec, p_vec = (torch.cat(parts)[back] for parts in (memory, m_vec, p_vec))
        by_context: dict[int, list[int]] = {}
        for i, watch in enumerate(watches):
            by_context.setdefault(id(watch.think[0]), []).append(i)
        z_vec = torch.empty(len(watches), memory.shape[-1], dtype=bundle.dtype, device=device)
        for members in by_context.values():
            context = watches[members[0]].think[0]
            rows = to_device([watches[i].think[1] for i in members], torch.long, device)
            index = to_device(members, torch.long, device)
            z_vec[index] = context.latents(rows, memory[index]).to(z_vec.dtype)
        return controller.shape_controls(z_vec, m_vec, p_vec).to(bundle.dtype)
