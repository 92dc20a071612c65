"""The language model as the fast forward runs it (`FastModel`): joined projections, compiled kernels.

A decode step of a 7B model at a few hundred rows spends a third of its time in small element-wise
kernels (RMSNorm's five, rotary's six, SiLU-times-up, residual adds) and in launching three q/k/v
and two gate/up matmuls where one each would do. `FastModel.compiled(lm)` joins the projection weights
(the original modules keep working: their weights become views of the joined ones, so no memory is
added; nothing else on the model changes) and holds them beside the model with a `Kernels` registry
of its own, which on a GPU runs each element-wise helper of `forward.py` as one kernel (our Triton
kernels, `triton_kernels.py`); elsewhere the helpers run as written, the same arithmetic
transformers' Llama uses (RMSNorm in float32, rotary in the model's dtype).

Who owns what: the engine (`runner.py`) builds one `FastModel` when a worker starts and hands it to
every pass it runs (`forward.forward_at`, the graphs, sampling, the controller's think pass); no
module-level registry and no mark on the model. A caller without an engine gets
`FastModel.plain(lm)`: the model's own modules, nothing compiled. Triton keeps the compiled kernels
in its on-disk cache, so a second worker on the machine, or the next run, loads them.
"""
from __future__ import annotations

import os
import warnings

import torch


class JoinedProjections:
    """Per layer: one [q; k; v] weight and one [gate; up] weight, and where to split their outputs."""

    def __init__(self, qkv: list[torch.Tensor], gate_up: list[torch.Tensor], q_size: int, kv_size: int,
                 intermediate: int):
        self.qkv, self.gate_up = qkv, gate_up
        self.q_size, self.kv_size, self.intermediate = q_size, kv_size, intermediate


class Kernels:
    """One model's element-wise helpers as one kernel each on a GPU: Triton kernels of our own for the
    hot ones (`triton_kernels.HAND_WRITTEN`: the compiler's start is never paid for them), the rest
    compiled on first use (dynamic shapes: one compile serves every batch); off a GPU each helper
    runs as written. A helper that cannot be built runs as written too, and is listed in
    `uncompiled` (its name and the error), for the worker to say."""

    def __init__(self):
        self._compiled: dict[str, object] = {}
        self.uncompiled: list[dict] = []

    def get(self, name: str, fn, device: torch.device):
        if not self.compiles_on(device):
            return fn
        if name not in self._compiled:
            self._compiled[name] = self._first_call_may_fall_back(name, fn)
        return self._compiled[name]

    def _first_call_may_fall_back(self, name: str, fn):
        """Compilation happens on the first call; if the platform cannot compile, run as written."""
        compiled = self._hand_written(name) or self._compile(fn)

        def first_call(*args):
            try:
                out = compiled(*args)
                self._compiled[name] = compiled
            except Exception as exc:  # noqa: BLE001 (no compiler, an unsupported op: same math, slower)
                warnings.warn(f"running {name} uncompiled: {type(exc).__name__}: {exc}", stacklevel=2)
                self.uncompiled.append({"name": name, "error": f"{type(exc).__name__}: {_first_line(exc)}"})
                self._compiled[name] = fn
                out = fn(*args)
            return out

        return first_call

    def compiles_on(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _hand_written(self, name: str):
        """Our Triton kernel for `name`, or None (none written, or no Triton here: then the compiler)."""
        try:
            from twig_batch.engine.triton_kernels import HAND_WRITTEN
        except ImportError:
            return None
        return HAND_WRITTEN.get(name)

    def _compile(self, fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)


def _first_line(exc: Exception, most: int = 200) -> str:
    """A compiler's errors run to pages: the first line says which."""
    lines = str(exc).strip().splitlines()
    return lines[0][:most] if lines else ""


class _AsWritten:
    """The helpers as written, never compiled (a model without an engine)."""

    uncompiled = ()  # nothing was meant to be compiled

    def get(self, name: str, fn, device: torch.device):
        return fn


AS_WRITTEN = _AsWritten()  # stateless: holds nothing


class FastModel:
    """`lm` (the language model), its `joined` projections (None: the layers' own modules) and the
    `kernels` its passes use."""

    def __init__(self, lm, joined: JoinedProjections | None = None, kernels=AS_WRITTEN):
        self.lm, self.joined, self.kernels = lm, joined, kernels

    @classmethod
    def plain(cls, lm) -> "FastModel":
        """The model's own modules, nothing compiled."""
        return cls(lm)

    @classmethod
    def compiled(cls, lm, join: bool = True) -> "FastModel":
        """Kernels of its own (compiled on a GPU) and, with `join`, joined projections (when the layers
        allow: none for biased layers)."""
        return cls(lm, join_projections(lm) if join else None, Kernels())

    @classmethod
    def for_device(cls, lm) -> "FastModel":
        """On a GPU (where kernel count is the cost) one-kernel helpers, and joined projections unless
        TWIG_BATCH_FUSED=0 (sampling and the fp8 quantizer stay one kernel each); plain elsewhere."""
        if lm.embed_tokens.weight.device.type != "cuda":
            return cls.plain(lm)
        return cls.compiled(lm, join=os.environ.get("TWIG_BATCH_FUSED", "1") != "0")

    @property
    def device(self) -> torch.device:
        return self.lm.embed_tokens.weight.device

    def kernel(self, name: str, fn, device: torch.device):
        return self.kernels.get(name, fn, device)


def join_projections(lm) -> JoinedProjections | None:
    """Join each layer's projections in place (the modules then read slices of the joined weights);
    None, and nothing changed, for biased layers. Joining a model joined before finds the same
    weights again: no second copy."""
    layers = list(lm.layers)
    if any(_has_bias(layer) for layer in layers):
        return None
    qkv, gate_up = [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv.append(_join([attn.q_proj, attn.k_proj, attn.v_proj]))
        gate_up.append(_join([mlp.gate_proj, mlp.up_proj]))
    first = layers[0]
    return JoinedProjections(qkv, gate_up, first.self_attn.q_proj.out_features,
                             first.self_attn.k_proj.out_features, first.mlp.gate_proj.out_features)


def _has_bias(layer) -> bool:
    modules = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
               layer.mlp.up_proj)
    return any(m.bias is not None for m in modules) or getattr(layer.mlp, "act_fn", None) is None


def _join(linears) -> torch.Tensor:
    weights = [m.weight.data for m in linears]
    rows, columns = sum(w.shape[0] for w in weights), weights[0].shape[1]
    if _already_joined(weights, columns):
        return weights[0].as_strided((rows, columns), (columns, 1), weights[0].storage_offset())
    joined = torch.cat(weights, dim=0)
    start = 0
    for m in linears:  # the modules now read slices of the joined weight: one copy in memory
        count = m.weight.shape[0]
        m.weight.data = joined[start:start + count]
        start += count
    return joined


def _already_joined(weights: list[torch.Tensor], columns: int) -> bool:
    """The weights are consecutive row blocks of one buffer (an earlier join's views)."""
    storage = weights[0].untyped_storage().data_ptr()
    offset = weights[0].storage_offset()
    for w in weights:
        if (w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset or not w.is_contiguous()
                or w.shape[1] != columns):
            return False
        offset += w.numel()
    return True
