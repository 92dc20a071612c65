"""bf16 checks of the fast engine against the reference loop on one GPU (SPEC §5).

Exact equality is not expected in bf16, so two things are measured instead:
- greedy decoding: how many of the first tokens of each band the two paths agree on;
- distributions: the total-variation distance between the two paths' sampling distributions
  (softmax of the CFG-guided logits, T = 1) at the same positions, after the same tokens. The
  scale it is judged on is the distance between two different prompts at the same position.
Also: whether a CUDA-graph replay and an eager step give the same hidden state, and how far apart.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.settings import GenerationSettings


class LogitsRecorder:
    """An observer that keeps the guided logits of every step (it never injects)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def begin_band(self, images, band):
        pass

    def observe(self, step, hidden, logits, tokens):
        self.steps.append(logits.float().cpu())
        return None

    def trigger_log(self, image):
        return []


def _tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.softmax(a, -1) - torch.softmax(b, -1)).abs().sum(-1)


def distribution_check(engine, rows: list[list[int]], steps: int = 16, prefixes=(0, 192, 384)) -> dict:
    """TV(fast, reference) per step while both paths have drawn the same tokens; TV between prompts."""
    bundle = engine.bundle
    settings = GenerationSettings()
    same, across = [], []
    for band_start in prefixes:
        prefix = torch.randint(0, bundle.model.config.vq_config.num_embeddings, (len(rows), band_start),
                               generator=torch.Generator().manual_seed(band_start))
        fast_log = LogitsRecorder()
        fast = engine.draw_image_tokens(rows, list(range(len(rows))), settings, steps, prefix_codes=prefix,
                                        first_step=band_start, observer=fast_log)
        fast_logits = torch.stack(fast_log.steps, 1)  # [B, steps, V]
        for b, row in enumerate(rows):
            ref_log = LogitsRecorder()
            ref = reference_image_tokens(bundle, row, b, settings, steps, prefix_codes=prefix[b],
                                         first_step=band_start, observer=ref_log)
            ref_logits = torch.cat(ref_log.steps, 0)  # [steps, V]
            agreeing = int((fast[b] == ref).cumprod(0).sum())  # steps drawn after identical tokens
            same += _tv(fast_logits[b, : agreeing + 1], ref_logits[: agreeing + 1]).tolist()[: steps]
        across += _tv(fast_logits[0, :1], fast_logits[1, :1]).tolist()
    return {"tv_fast_vs_reference_max": max(same), "tv_fast_vs_reference_mean": sum(same) / len(same),
            "tv_positions_compared": len(same), "tv_between_prompts_min": min(across)}


def greedy_agreement(engine, rows: list[list[int]], n: int = 32) -> dict:
    """Greedy tokens of both paths at the start of each band. Where the first tokens differ, how close
    the reference's own logits had the two picks (`reference_gap`) against how far the two paths'
    logits are apart at that step (`logit_noise`): a gap below the noise is a tie bf16 cannot break."""
    bundle = engine.bundle
    settings = GenerationSettings(temperature=0)
    agree, disagreements = [], []
    for band in range(3):
        codebook = bundle.model.config.vq_config.num_embeddings
        prefix = torch.randint(0, codebook, (len(rows), band * 192), generator=torch.Generator().manual_seed(band))
        fast_log = LogitsRecorder()
        fast = engine.draw_image_tokens(rows, [0] * len(rows), settings, n, prefix_codes=prefix,
                                        first_step=band * 192, observer=fast_log)
        for b in range(len(rows)):
            ref_log = LogitsRecorder()
            ref = reference_image_tokens(bundle, rows[b], 0, settings, n, prefix_codes=prefix[b],
                                         first_step=band * 192, observer=ref_log)
            agree.append(int((fast[b] == ref).cumprod(0).sum()))
            if fast[b, 0] != ref[0]:
                ref_first, fast_first = ref_log.steps[0][0], fast_log.steps[0][b]
                disagreements.append({
                    "band": band, "prompt": b,
                    "reference_gap": (ref_first[ref[0]] - ref_first[fast[b, 0]]).item(),
                    "logit_noise": (fast_first - ref_first).abs().max().item()})
    return {"greedy_first_tokens_agreeing": agree, "greedy_tokens_compared": n,
            "greedy_first_token_agrees": sum(a > 0 for a in agree), "greedy_bands": len(agree),
            "greedy_first_token_disagreements": disagreements}


def graph_vs_eager(engine, rows: list[list[int]]) -> dict:
    """The same 130 steps replayed from CUDA graphs and run eagerly: tokens, and where they part.
    Each path also runs twice, with the same observer (it widens the cache): if a path does not
    repeat itself, the two cannot be expected to agree."""
    settings = GenerationSettings()
    seeds = list(range(len(rows)))
    runs = {}
    for name, graphs in (("graph", True), ("eager", False), ("graph_again", True), ("eager_again", False)):
        log = LogitsRecorder()
        runs[name] = (draw_image_tokens_fast(engine.bundle, rows, seeds, settings, 130, use_graphs=graphs, observer=log,
                                             model=engine.model), log)
    (a, graph_log), (b, eager_log) = runs["graph"], runs["eager"]
    (a2, graph_log2), (b2, eager_log2) = runs["graph_again"], runs["eager_again"]
    second = (graph_log.steps[1] - eager_log.steps[1]).abs().max().item()  # step 1 is the first decode step
    return {"graph_tokens_equal_eager": bool(torch.equal(a, b)), "graph_vs_eager_first_decode_logit_gap": second,
            "graph_vs_eager_first_decode_tv": _tv(graph_log.steps[1], eager_log.steps[1]).max().item(),
            "graph_tokens_repeat": bool(torch.equal(a, a2)), "eager_tokens_repeat": bool(torch.equal(b, b2)),
            "graph_vs_eager_first_differing_step": _first_difference(a, b),
            "graph_vs_eager_first_differing_logits_step": _first_logit_difference(graph_log, eager_log),
            "graph_repeat_first_differing_logits_step": _first_logit_difference(graph_log, graph_log2),
            "eager_repeat_first_differing_logits_step": _first_logit_difference(eager_log, eager_log2)}


def _first_logit_difference(a: LogitsRecorder, b: LogitsRecorder) -> int | None:
    """The first step whose logits differ in any bit (None if none do)."""
    return next((i for i, (x, y) in enumerate(zip(a.steps, b.steps)) if not torch.equal(x, y)), None)


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first step at which any image's tokens differ (None if none do)."""
    differs = (a != b).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else None
