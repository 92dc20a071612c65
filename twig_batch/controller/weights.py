"""The controller's learnable weights: build, seed-initialise, save and load (safetensors).

No training ships with the design, so a run without a weights file gets a deterministic
initialisation from `init_seed`: the same numbers on every machine, device and batch size.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from torch import nn

from twig_batch.controller.condenser import Condenser
from twig_batch.settings import ControllerConfig
from twig_batch.controller.shaper import Shaper
from twig_batch.controller.translator import Translator
from twig_batch.errors import ModelLoadError

FORMAT = "twig-batch-controller"


class ControllerNet(nn.Module):
    def __init__(self, hidden_size: int, config: ControllerConfig):
        super().__init__()
        self.hidden_size = hidden_size
        self.condenser = Condenser(hidden_size, config.memory_tokens, config.attention_heads)
        self.translator = Translator(hidden_size)
        self.shaper = Shaper(hidden_size, config.control_tokens)


def init_weights(net: ControllerNet, seed: int, std: float) -> ControllerNet:
    """Weights ~ N(0, std) drawn in name order from one CPU generator, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(net.named_parameters()):
            if name.endswith("bias"):
                param.zero_()
            else:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(values.to(param.dtype))
    return net


def build_controller_net(hidden_size: int, config: ControllerConfig, device=None, dtype=None,
                         weights: str | os.PathLike | None = None) -> ControllerNet:
    """The controller's weights for a model of `hidden_size`: from `weights` (or config.weights) if
    given, else seeded; placed on `device` in `dtype` (the language model's)."""
    try:
        net = ControllerNet(hidden_size, config)
    except ValueError as exc:
        raise ModelLoadError(f"controller does not fit the model: {exc}") from None
    path = weights if weights is not None else config.weights
    if path is None:
        init_weights(net, config.init_seed, config.init_std)
    else:
        load_weights(net, path)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_weights(net: ControllerNet, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in net.state_dict().items()}
    meta = {"format": FORMAT, "hidden_size": str(net.hidden_size),
            "memory_tokens": str(net.condenser.latents.shape[0]), "control_tokens": str(net.shaper.control_tokens)}
    save_file(state, str(path), metadata=meta)
    return path


def load_weights(net: ControllerNet, path: str | os.PathLike) -> ControllerNet:
    """Fill `net` from a safetensors file; any missing, extra or misshapen tensor is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"controller weights file {path} does not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"controller weights file {path} is not a readable safetensors file: {exc}") from None
    _check_fit(path, net, {name: tuple(tensor.shape) for name, tensor in state.items()})
    expected = net.state_dict()
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name].to(tensor.dtype))
    return net


def check_weights_file(path: str | os.PathLike, hidden_size: int, config: ControllerConfig) -> None:
    """Check a weights file against the controller of a model of `hidden_size` without loading it:
    only the file's header (tensor names and shapes) is read, so a batch job can refuse a misfit
    before any actor starts."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"controller weights file {path} does not exist")
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = ControllerNet(hidden_size, config)
    except ValueError as exc:
        raise ModelLoadError(f"controller does not fit the model: {exc}") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"controller weights file {path} is not a readable safetensors file: {exc}") from None
    _check_fit(path, net, shapes)


def _check_fit(path, net: ControllerNet, shapes: dict[str, tuple]) -> None:
    """Every tensor the controller has, by name and shape; anything missing, extra or misshapen is named."""
    expected = {name: tuple(tensor.shape) for name, tensor in net.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise ModelLoadError(f"controller weights {path} do not match the controller: {'; '.join(parts)}")
    misfits = [f"{name} has shape {list(shapes[name])}, needs {list(shape)}"
               for name, shape in expected.items() if tuple(shapes[name]) != shape]
    if misfits:
        more = f"; and {len(misfits) - 8} more misshapen tensor(s)" if len(misfits) > 8 else ""
        raise ModelLoadError(f"controller weights {path} do not fit this model (hidden size {net.hidden_size}) and "
                             f"controller config: tensor {'; tensor '.join(misfits[:8])}{more}")


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, ControllerNet)


def shared_controller_net(bundle, config: ControllerConfig) -> ControllerNet:
    """The controller weights for `bundle` and `config`, built (or read) once and reused by later
    batches; one set is kept per model, so a long run never accumulates copies."""
    path = Path(config.weights) if config.weights is not None else None
    stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size) if path and path.is_file() else None
    key = (stamp, config.weights, config.init_seed, config.init_std, config.memory_tokens, config.control_tokens,
           config.attention_heads, str(bundle.device), bundle.dtype)
    held = _SHARED.get(bundle.model)
    if held is not None and held[0] == key:
        return held[1]
    _SHARED.pop(bundle.model, None)  # free the old set before building the new one
    net = build_controller_net(bundle.model.config.text_config.hidden_size, config, bundle.device, bundle.dtype)
    _SHARED[bundle.model] = (key, net)
    return net
