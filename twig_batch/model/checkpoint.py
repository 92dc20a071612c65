"""What a model reference names, told from its files alone: no torch, no weights read.

A reference is a built-in tiny model (`BUILTIN_GRIDS`, `tiny_config` its geometry), a random
Janus-Pro-sized model (`RANDOM_MODELS`), a local folder in transformers' or DeepSeek's layout, or a
Hugging Face id. The batch driver checks references here before any actor starts, without
importing torch; reading a config (a local folder's, a tiny model's whole config) imports
transformers, and torch with it, only then. What the driver needs of a tiny model, its geometry
(`model_geometry`), is known without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from twig_batch.errors import ModelLoadError

# Built-in model references -> token grid (image tokens per side): random tiny models built offline.
BUILTIN_GRIDS = {"tiny": 24, "tiny-micro": 6}
TINY_HIDDEN_SIZE = 64  # the built-in tiny models' width (what their controller weights must fit)
RANDOM_MODELS = ("random-7b", "random-1b")  # Janus-Pro-sized random weights, for speed runs

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def detect_layout(folder: Path) -> str:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json: not a Janus checkpoint")
    raw = read_json(config_path)
    if raw.get("model_type") == "janus":
        return "hf"
    if "language_config" in raw and "gen_vision_config" in raw:
        return "deepseek"
    raise ModelLoadError(
        f"unknown checkpoint layout in {config_path} (model_type={raw.get('model_type')!r}): expected transformers' "
        "Janus layout (model_type 'janus') or DeepSeek's original layout (language_config + gen_vision_config)"
    )


def check_checkpoint(ref: str):
    """Check a model reference without loading any weights and return its JanusConfig.

    A local folder must hold config.json, a tokenizer and its weights (every shard its index names);
    the first missing piece is named. Returns None where only a download would tell (Hugging Face
    ids), for a path this machine does not have (on a cluster it may exist on the GPU nodes only;
    the actors then report it) and for the random-* speed models (Janus-Pro's own geometry).
    """
    if ref in BUILTIN_GRIDS:  # built offline on first use: its config is known without building it
        return tiny_config(1024, 0, {}, grid=BUILTIN_GRIDS[ref])
    if ref in RANDOM_MODELS:
        return None
    if not Path(ref).expanduser().exists():  # a Hugging Face id, or a folder on the workers' disks only
        return None
    folder = local_folder(ref)
    if folder is None:
        return None
    layout = detect_layout(folder)
    tokenizer_file(folder)
    weight_files(folder)
    raw = read_json(folder / "config.json")
    try:
        if layout == "hf":
            from transformers import JanusConfig

            return JanusConfig.from_dict(raw)
        from twig_batch.model.deepseek_layout import janus_config_from_deepseek

        return janus_config_from_deepseek(raw, 0, {})
    except Exception as exc:  # a config that transformers cannot read fails the same way on every actor
        raise ModelLoadError(f"cannot read the model config {folder / 'config.json'}: {type(exc).__name__}: "
                             f"{exc}") from None


def model_geometry(ref: str) -> tuple[int, int] | None:
    """(image tokens a side, hidden size) of a model reference, checked as `check_checkpoint` does; None
    where it returns None. The built-in tiny models' is known without transformers (nor torch)."""
    if ref in BUILTIN_GRIDS:
        return BUILTIN_GRIDS[ref], TINY_HIDDEN_SIZE
    config = check_checkpoint(ref)
    return None if config is None else (config.vq_config.num_patches, config.text_config.hidden_size)


def local_folder(ref: str) -> Path | None:
    """The checkpoint folder `ref` names, or None for a Hugging Face id that is not a local path."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model reference {ref} is a file; pass the checkpoint folder")
        return path
    looks_like_hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelLoadError(f"model folder {ref} does not exist")
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def tokenizer_file(folder: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"model folder {folder} has no tokenizer (neither tokenizer.json nor tokenizer.model)")


def weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                shards = sorted(set(read_json(path)["weight_map"].values()))
                absent = [s for s in shards if not (folder / s).is_file()]
                if absent:
                    raise ModelLoadError(f"model folder {folder} is missing weight shards: {', '.join(absent[:5])}")
                return [folder / s for s in shards]
            return [path]
    raise ModelLoadError(f"model folder {folder} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def tiny_config(vocab_size: int, image_token_id: int, special: dict, vq_downsample: int = 4, grid: int = 24):
    """The geometry of the built-in tiny models (`tiny.py` builds and saves them): `grid` image tokens a side."""
    from transformers import JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    levels = {4: [1, 1, 1], 16: [1, 1, 2, 2, 4]}
    if vq_downsample not in levels:
        raise ValueError(f"vq_downsample must be 4 or 16, got {vq_downsample}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    hidden = TINY_HIDDEN_SIZE
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, **special)
    # transformers derives the generation grid from the vision tower: image_size / patch_size tokens per side.
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=4 * grid,
                               patch_size=4, projection_dim=hidden, num_image_tokens=grid * grid)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=512, base_channels=32, latent_channels=32,
                          channel_multiplier=levels[vq_downsample], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=False)
