"""Fewer, bigger kernels for the decode step: joined projections and compiled element-wise work.

A decode step of a 7B model at a few hundred rows spends a third of its time in small element-wise
kernels (RMSNorm's five, rotary's six, SiLU-times-up, residual adds) and in launching three q/k/v
and two gate/up matmuls where one each would do. `fuse_decoder(lm)` joins the projection weights
(the original modules keep working: their weights become views of the joined ones, so no memory is
added) and marks the model; `forward.forward_at` then runs the joined matmuls. On a GPU `KERNELS` compiles
each element-wise helper of `forward.py` once into one kernel; elsewhere it runs as written, which
is the same arithmetic transformers' Llama uses (RMSNorm in float32, rotary in the model's dtype).
"""
from __future__ import annotations

import os
import warnings

import torch

FUSED_ATTR = "_twig_fused_projections"


class JoinedProjections:
    """Per layer: one [q; k; v] weight and one [gate; up] weight, and where to split their outputs."""

    def __init__(self, qkv: list[torch.Tensor], gate_up: list[torch.Tensor], q_size: int, kv_size: int,
                 intermediate: int):
        self.qkv, self.gate_up = qkv, gate_up
        self.q_size, self.kv_size, self.intermediate = q_size, kv_size, intermediate


def fuse_decoder(lm) -> JoinedProjections | None:
    """Join each layer's projections in place; returns None (and changes nothing) for biased layers."""
    existing = getattr(lm, FUSED_ATTR, None)
    if existing is not None:
        return existing
    layers = list(lm.layers)
    if any(_has_bias(layer) for layer in layers):
        return None
    qkv, gate_up = [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv.append(_join([attn.q_proj, attn.k_proj, attn.v_proj]))
        gate_up.append(_join([mlp.gate_proj, mlp.up_proj]))
    first = layers[0]
    joined = JoinedProjections(qkv, gate_up, first.self_attn.q_proj.out_features,
                               first.self_attn.k_proj.out_features, first.mlp.gate_proj.out_features)
    setattr(lm, FUSED_ATTR, joined)
    return joined


def _has_bias(layer) -> bool:
    modules = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
               layer.mlp.up_proj)
    return any(m.bias is not None for m in modules) or getattr(layer.mlp, "act_fn", None) is None


def _join(linears) -> torch.Tensor:
    joined = torch.cat([m.weight.data for m in linears], dim=0)
    start = 0
    for m in linears:  # the modules now read slices of the joined weight: one copy in memory
        rows = m.weight.shape[0]
        m.weight.data = joined[start:start + rows]
        start += rows
    return joined


class _Kernels:
    """The helpers, compiled on first use on a GPU (dynamic shapes: one compile serves every batch)."""

    def __init__(self):
        self._compiled: dict[str, object] = {}

    def get(self, name: str, fn, device: torch.device):
        if device.type != "cuda":
            return fn
        if name not in self._compiled:
            self._compiled[name] = self._first_call_may_fall_back(name, fn)
        return self._compiled[name]

    def _first_call_may_fall_back(self, name: str, fn):
        """Compilation happens on the first call; if the platform cannot compile, run as written."""
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        def first_call(*args):
            try:
                out = compiled(*args)
                self._compiled[name] = compiled
            except Exception as exc:  # noqa: BLE001 (no compiler, an unsupported op: same math, slower)
                warnings.warn(f"running {name} uncompiled: {type(exc).__name__}: {exc}", stacklevel=2)
                self._compiled[name] = fn
                out = fn(*args)
            return out

        return first_call


KERNELS = _Kernels()


def fuse_for_device(lm) -> None:
    """The fast engines fuse on a GPU (where kernel count is the cost); TWIG_BATCH_FUSED=0 turns it off."""
    weight = lm.embed_tokens.weight
    if weight.device.type == "cuda" and os.environ.get("TWIG_BATCH_FUSED", "1") != "0":
        fuse_decoder(lm)
