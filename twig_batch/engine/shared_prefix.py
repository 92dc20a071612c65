"""Prefill once what several prompts of a text call begin with: the same picture.

In twig mode a reflection on band k and the thought for band k+1 are written in one call, and both
open with the same system text and the same partial image (576 vision tokens of a ~700-token
prompt). That prefix is prefilled once, on one row per picture, and copied into the other rows;
then every row prefills only its own question.

Layout of a row: [prefix: P columns][padding][question, right-aligned]. The padding is masked and
positions count real tokens only, so a row computes what it would alone; only the order of the
sums differs (prefix and question in two passes instead of one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.static_decoder import StaticKVCache, forward_static


@dataclass(frozen=True)
class SharingPlan:
    prefix: int  # P: the tokens every prompt has before its question (system text, picture)
    order: list[int]  # prompt index of each cache row: one row per distinct prefix first
    distinct: int  # rows 0..distinct-1 prefill their prefix; later rows copy one of theirs
    source: list[int]  # for each later row, the row whose prefix it copies


def picture_prefix(bundle, prompt) -> int | None:
    """The tokens `prompt` has up to the end of its picture (BOS, system text, the image block), or
    None when it shows no picture or asks nothing after it."""
    image = bundle.tokens.image
    if prompt.image_features is None or image not in prompt.ids:
        return None
    end = len(prompt.ids) - prompt.ids[::-1].index(image) + 1  # past the last placeholder and end-of-image
    return end if end < len(prompt.ids) else None


def _picture_key(prompt, end: int) -> tuple:
    features = prompt.image_features
    return tuple(prompt.ids[:end]), features.data_ptr(), tuple(features.shape), str(features.device)


def shared_picture_prefix(bundle, first, second) -> int:
    """The tokens two prompts begin with alike, picture and all (the very same feature tensor), or 0."""
    end = picture_prefix(bundle, first)
    if end is None or picture_prefix(bundle, second) != end:
        return 0
    return end if _picture_key(first, end) == _picture_key(second, end) else 0


def sharing_plan(bundle, prompts) -> SharingPlan | None:
    """None unless every prompt shows a picture after the same P - (image block) tokens and at least
    two show the same one (equal ids up to P and the very same feature tensor)."""
    lengths, groups = set(), {}
    for index, prompt in enumerate(prompts):
        end = picture_prefix(bundle, prompt)
        if end is None:
            return None
        lengths.add(end)
        groups.setdefault(_picture_key(prompt, end), []).append(index)
    if len(lengths) != 1 or len(groups) == len(prompts):
        return None
    members = list(groups.values())
    later = [(row, g) for g, rows in enumerate(members) for row in rows[1:]]
    return SharingPlan(prefix=lengths.pop(), order=[rows[0] for rows in members] + [row for row, _ in later],
                       distinct=len(members), source=[g for _, g in later])


def prefill_shared(bundle, plan: SharingPlan, embeds: torch.Tensor, mask: torch.Tensor, width: int, columns: int,
                   arenas=None, model: FastModel | None = None) -> tuple[StaticKVCache, torch.Tensor, torch.Tensor]:
    """Prefill the prompts of `plan.order` (left-padded `embeds` [R, W0, D], `mask` [R, W0], rows in
    that order) through `model` (the engine's `fused.FastModel`; None: the model as written). Returns a cache `columns` wide (borrowed from the
    engine's `arenas` when given) filled to column `width` (>= every prompt's length), the last hidden
    states [R, D] and each row's next position [R, 1]."""
    lm, device = bundle.language_model, embeds.device
    model = model or FastModel.plain(lm)
    rows, w0, dim = embeds.shape
    prefix, distinct = plan.prefix, plan.distinct
    lengths = mask.sum(1).tolist()
    starts = [w0 - n for n in lengths]
    cache = StaticKVCache(lm, rows, columns, arenas=arenas)
    # The distinct prefixes, into cache rows 0..distinct-1.
    firsts = torch.stack([embeds[r, starts[r]:starts[r] + prefix] for r in range(distinct)])
    forward_static(model, cache, firsts, torch.arange(prefix, device=device).expand(distinct, prefix),
                   torch.ones((distinct, prefix), dtype=torch.bool, device=device), first_rows=True)
    source = torch.tensor(plan.source, dtype=torch.long, device=device)
    for layer in range(cache.k.shape[0]):  # a layer at a time: the copies stay small
        cache.k[layer, distinct:, :, :prefix] = cache.k[layer, source, :, :prefix]
        cache.v[layer, distinct:, :, :prefix] = cache.v[layer, source, :, :prefix]
    cache.valid[distinct:, :prefix] = True
    # Every row's question, right-aligned in the columns after the prefix.
    tail = width - prefix
    questions = embeds.new_zeros(rows, tail, dim)
    real = torch.zeros((rows, tail), dtype=torch.bool, device=device)
    for r in range(rows):
        n = lengths[r] - prefix
        questions[r, tail - n:] = embeds[r, starts[r] + prefix:]
        real[r, tail - n:] = True
    cache.used = prefix
    positions = prefix + (real.long().cumsum(-1) - 1).clamp(min=0)
    hidden = forward_static(model, cache, questions, positions, real)[:, -1]
    return cache, hidden, positions[:, -1:] + 1

