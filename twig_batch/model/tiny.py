"""Tiny random Janus models, built offline, saved exactly like real checkpoints.

They exercise every code path (LM, generation head, VQ decoder, SigLIP understanding path) in
seconds on a CPU. The default keeps Janus-Pro's 24 x 24 token grid (so any band count that divides
24 works) with a 4x VQ decoder (96-px images); `vq_downsample=16` gives the real 384-px geometry.
`grid=6` is the micro variant (`--model tiny-micro`): 36 image tokens, 24-px images, bands 1, 2, 3
or 6, about sixteen times less decoding per image, for runs of thousands of images in tests.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from twig_batch.model import bundle as names
from twig_batch.model.building import build_model, default_cache_dir
from twig_batch.model.checkpoint import BUILTIN_GRIDS, tiny_config
from twig_batch.model.bundle import SpecialTokens
from twig_batch.model.deepseek_layout import deepseek_config_from_janus, hf_state_to_deepseek

TINY_VERSION = 2  # 2: the saved generation config is the one transformers' own image generate needs
_WORDS = (
    "a an the red green blue yellow white black orange purple small large tiny huge old new bright dark cube "
    "sphere cat dog bird tree house car boat mountain river sky cloud sun moon star city street forest field "
    "flower garden beach ocean wave road bridge tower castle window door table chair cup book lamp painting "
    "portrait landscape photo of on in under over next to with and near behind top middle bottom part image "
    "band left right center background foreground light shadow sunset morning night snow rain glass metal wood "
    "stone describe score improve sentence visible content artist stage draw paint thought reflection"
).split()


def train_tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here on generated text, with Janus's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(_WORDS), (4000, 8), generator=generator).tolist()
    corpus = [" ".join(_WORDS[i] for i in row) for row in picks] + [" ".join(_WORDS)]
    specials = [names.BOS, names.EOS, names.PAD, names.IMAGE, names.BOI, names.EOI, "<|User|>", "<|Assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names.BOS, eos_token=names.EOS, pad_token=names.PAD,
        extra_special_tokens={"image_token": names.IMAGE, "boi_token": names.BOI, "eoi_token": names.EOI},
    )


def make_tiny_model(folder: str | Path, layout: str = "hf", seed: int = 0, vq_downsample: int = 4,
                    grid: int = 24) -> Path:
    """Build a random tiny Janus and save it in `layout` ('hf' or 'deepseek') under `folder`."""
    if layout not in ("hf", "deepseek"):
        raise ValueError(f"layout must be 'hf' or 'deepseek', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    tokens = SpecialTokens.from_vocab(tokenizer.get_vocab())
    special = {"bos_token_id": tokens.bos, "eos_token_id": tokens.eos, "pad_token_id": tokens.pad}
    config = tiny_config(len(tokenizer), tokens.image, special, vq_downsample, grid)
    torch.manual_seed(seed)
    model = build_model(config, tokens, "cpu", torch.float32, init_weights=True)
    tokenizer.save_pretrained(str(folder))
    preprocessor = {"image_size": config.vision_config.image_size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    if layout == "hf":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model.save_pretrained(str(folder))  # with generation_config.json, as a converted checkpoint has
    else:
        state = hf_state_to_deepseek({k: v.contiguous() for k, v in model.state_dict().items()})
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(deepseek_config_from_janus(config), indent=2))
    return folder


def tiny_model_path(ref: str = "tiny") -> Path:
    """A cached built-in tiny model (HF layout), built on first use; safe under concurrent builders."""
    grid = BUILTIN_GRIDS[ref]
    target = default_cache_dir() / f"{ref}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_model(staging, grid=grid)
        try:
            os.rename(staging, target)  # atomic: a racing builder's copy is identical, keep whichever won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
