"""`load_janus`: the one way every part of twig-batch gets a model.

A reference is `tiny` or `tiny-micro` (random tiny models built offline and cached), a local folder in the
transformers layout or in DeepSeek's original layout, or a Hugging Face id (resolved through the
local Hugging Face cache / hub). Every failure becomes one `ModelLoadError` with a plain message.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from twig_batch.errors import ModelLoadError
from twig_batch.model import bundle as tokens_mod
from twig_batch.model.building import build_model
from twig_batch.model.checkpoint import (RANDOM_MODELS, detect_layout, local_folder, read_json, tokenizer_file,
                                         weight_files)
from twig_batch.model.bundle import JanusBundle, SpecialTokens
from twig_batch.model.deepseek_layout import deepseek_state_to_hf, janus_config_from_deepseek

def load_janus(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> JanusBundle:
    """Load Janus-Pro from `ref` onto `device` in `dtype`."""
    if ref in RANDOM_MODELS:  # full-size random weights: speed runs without downloads
        from twig_batch.model.random_full import random_janus

        return random_janus(ref.split("-")[1], device, dtype)
    if ref in ("tiny", "tiny-micro"):
        from twig_batch.model.tiny import tiny_model_path

        folder = tiny_model_path(ref)
    else:
        folder = _resolve_folder(ref)
    layout = detect_layout(folder)
    raw = read_json(folder / "config.json")
    tokenizer = _load_tokenizer(folder, layout)
    special = _special_tokens(tokenizer, folder)
    if layout == "hf":
        from transformers import JanusConfig

        config = JanusConfig.from_dict(raw)
    else:
        config = janus_config_from_deepseek(raw, special.image, {"bos_token_id": special.bos,
                                                                  "eos_token_id": special.eos,
                                                                  "pad_token_id": special.pad})
    state = _read_state(folder)
    if layout == "deepseek":
        state = deepseek_state_to_hf(state)
    model = _build_and_fill(config, special, state, folder, device, dtype)
    mean, std = _image_normalisation(folder)
    return JanusBundle(model=model, tokenizer=tokenizer, tokens=special, ref=ref, layout=layout,
                       image_mean=mean, image_std=std)


def _resolve_folder(ref: str) -> Path:
    path = local_folder(ref)
    if path is not None:
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref))
    except Exception as exc:  # network, auth, unknown repo: all one message
        raise ModelLoadError(
            f"model {ref!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


def _load_tokenizer(folder: Path, layout: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer_file(folder)
    try:
        # AutoTokenizer would consult DeepSeek's config.json, whose model type it does not know.
        loader = AutoTokenizer if layout == "hf" else PreTrainedTokenizerFast
        return loader.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {exc}") from None


def _special_tokens(tokenizer, folder: Path) -> SpecialTokens:
    vocab = tokenizer.get_vocab()
    names = (tokens_mod.BOS, tokens_mod.EOS, tokens_mod.PAD, tokens_mod.IMAGE, tokens_mod.BOI, tokens_mod.EOI)
    missing = [text for text in names if text not in vocab]
    if missing:
        raise ModelLoadError(f"the tokenizer in {folder} lacks Janus's special tokens: {', '.join(missing)}")
    return SpecialTokens.from_vocab(vocab)


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(path)))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:
            raise ModelLoadError(f"cannot read weights {path}: {exc}") from None
    return state


def _build_and_fill(config, tokens: SpecialTokens, state, folder: Path, device, dtype) -> torch.nn.Module:
    # A checkpoint with its own lm_head (Janus-Pro's) is loaded untied. JanusConfig defaults
    # tie_word_embeddings to True, and whether a model built from a config that leaves it out shares
    # lm_head's storage with embed_tokens depends on the transformers release: shared, the second
    # tensor copied in would silently overwrite the first.
    own_head = "lm_head.weight" in state
    if own_head:
        config = _untied(config)
    model = build_model(config, tokens, device, dtype)
    if own_head:
        _untie(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (k == "lm_head.weight" and _ties(config))]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} missing weights, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights, e.g. {', '.join(unexpected[:3])}")
    if problems:
        raise ModelLoadError(f"weights in {folder} do not fit its config: " + " | ".join(problems))
    with torch.no_grad():
        for key, target in expected.items():
            source = state.get(key)
            if source is None:  # a tied checkpoint's lm_head is its input embedding
                source = state["model.language_model.embed_tokens.weight"]
            target.copy_(source.to(dtype))
    return model


def _ties(config) -> bool:
    """Whether `config` asks for lm_head to be the input embedding (JanusConfig's default, when unset)."""
    return bool(getattr(config, "tie_word_embeddings", False))


def _untied(config):
    """A copy of `config` that asks for an lm_head of its own, at the top and in the text config."""
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    return config


def _untie(model) -> None:
    """Give lm_head storage of its own, should this transformers release have tied it at construction anyway."""
    head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
    if head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr():
        model.lm_head.weight = torch.nn.Parameter(head.detach().clone(), requires_grad=False)


def _image_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = folder / "preprocessor_config.json"
    raw = read_json(path) if path.is_file() else {}
    return tuple(raw.get("image_mean", (0.5,) * 3)), tuple(raw.get("image_std", (0.5,) * 3))
