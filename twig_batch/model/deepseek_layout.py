"""DeepSeek's original Janus-Pro checkpoint layout, mapped onto transformers' Janus modules.

| DeepSeek key (`deepseek-ai/Janus-Pro-7B`)          | transformers key (`deepseek-community/Janus-Pro-7B`)  |
| -------------------------------------------------- | ----------------------------------------------------- |
| `language_model.model.*`                           | `model.language_model.*`                              |
| `language_model.lm_head.weight`                    | `lm_head.weight`                                      |
| `gen_embed.weight`                                 | `model.generation_embeddings.weight`                  |
| `gen_aligner.layers.0.*` / `.layers.2.*`           | `model.generation_aligner.fc1.*` / `.hidden_layers.0.*` |
| `gen_head.output_mlp_projector.*`                  | `model.generation_head.proj_out.*`                    |
| `gen_head.vision_head.*`                           | `model.generation_head.vision_head.*`                 |
| `aligner.layers.0.*` / `.layers.2.*`               | `model.aligner.fc1.*` / `.hidden_layers.0.*`          |
| `gen_vision_model.*` (`conv_blocks`, `res`, `mid.0/1/2`) | `model.vqmodel.*` (`down`/`up`, `block`, `mid.block_1/attn_1/block_2`) |
| `gen_vision_model.quantize.codebook_used`          | dropped (training statistic)                          |
| `vision_model.vision_tower.patch_embed.proj.*`     | `model.vision_model.embeddings.patch_embedding.*`     |
| `vision_model.vision_tower.pos_embed` [1, N, D]    | `model.vision_model.embeddings.position_embedding.weight` [N, D] |
| `vision_model.vision_tower.blocks.i.attn.qkv.*`    | `model.vision_model.encoder.layers.i.self_attn.{q,k,v}_proj.*` (split in three) |
| `vision_model.vision_tower.blocks.i.attn.proj.*`   | `...layers.i.self_attn.projection_layer.*`            |
| `vision_model.vision_tower.blocks.i.norm1/norm2.*` | `...layers.i.layer_norm1/layer_norm2.*`               |
| `vision_model.vision_tower.blocks.i.mlp.*`         | `...layers.i.mlp.*`                                   |
| `vision_model.vision_tower.norm.*`                 | `model.vision_model.post_layernorm.*`                 |
| `vision_model.vision_tower.attn_pool.*`            | dropped (unused by Janus)                             |
"""
from __future__ import annotations

import re

import torch

# (DeepSeek pattern, transformers replacement), applied in order to each key; None drops the key.
_TO_HF: list[tuple[str, str | None]] = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.2\.", "model.generation_aligner.hidden_layers.0."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.2\.", "model.aligner.hidden_layers.0."),
    (r"^gen_vision_model\.quantize\.codebook_used$", None),
    (r"^gen_vision_model\.encoder\.conv_blocks\.", "model.vqmodel.encoder.down."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.", "model.vqmodel.decoder.up."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"^vision_model\.vision_tower\.attn_pool\..*", None),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.", "model.vision_model.encoder.layers."),
]
# Renames inside the VQ model and the vision blocks (after the prefix rules above).
_VQ_PARTS = [(r"\.res\.", ".block."), (r"\.mid\.0\.", ".mid.block_1."), (r"\.mid\.1\.", ".mid.attn_1."),
             (r"\.mid\.2\.", ".mid.block_2.")]
_VIT_PARTS = [(r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
              (r"\.attn\.proj\.", ".self_attn.projection_layer."), (r"\.attn\.qkv\.", ".self_attn.qkv.")]

_VQ_PREFIX = "model.vqmodel."
_VIT_PREFIX = "model.vision_model.encoder.layers."
_POS_EMBED = "model.vision_model.embeddings.position_embedding.weight"


def deepseek_key_to_hf(key: str) -> str | None:
    for pattern, replacement in _TO_HF:
        if re.search(pattern, key):
            if replacement is None:
                return None
            key = re.sub(pattern, replacement, key)
            break
    else:
        return key  # unknown keys pass through and are reported as unexpected by the loader
    parts = _VQ_PARTS if key.startswith(_VQ_PREFIX) else _VIT_PARTS if key.startswith(_VIT_PREFIX) else []
    for pattern, replacement in parts:
        key = re.sub(pattern, replacement, key)
    return key


def deepseek_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = deepseek_key_to_hf(key)
        if new is None:
            continue
        if ".self_attn.qkv." in new:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.chunk(tensor, 3, dim=0)):
                out[new.replace(".qkv.", f".{name}.")] = part
        elif new == _POS_EMBED and tensor.dim() == 3:
            out[new] = tensor.squeeze(0)
        else:
            out[new] = tensor
    return out


def hf_state_to_deepseek(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse mapping; used to write DeepSeek-layout checkpoints (tiny test models)."""
    inverse = {
        "lm_head.": "language_model.lm_head.",
        "model.language_model.": "language_model.model.",
        "model.generation_embeddings.": "gen_embed.",
        "model.generation_aligner.fc1.": "gen_aligner.layers.0.",
        "model.generation_aligner.hidden_layers.0.": "gen_aligner.layers.2.",
        "model.generation_head.proj_out.": "gen_head.output_mlp_projector.",
        "model.generation_head.vision_head.": "gen_head.vision_head.",
        "model.aligner.fc1.": "aligner.layers.0.",
        "model.aligner.hidden_layers.0.": "aligner.layers.2.",
        "model.vqmodel.encoder.down.": "gen_vision_model.encoder.conv_blocks.",
        "model.vqmodel.decoder.up.": "gen_vision_model.decoder.conv_blocks.",
        "model.vqmodel.": "gen_vision_model.",
        "model.vision_model.embeddings.patch_embedding.": "vision_model.vision_tower.patch_embed.proj.",
        "model.vision_model.post_layernorm.": "vision_model.vision_tower.norm.",
        "model.vision_model.encoder.layers.": "vision_model.vision_tower.blocks.",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == _POS_EMBED:
            out["vision_model.vision_tower.pos_embed"] = tensor.unsqueeze(0)
            continue
        new = key
        for prefix, replacement in inverse.items():
            if key.startswith(prefix):
                new = replacement + key[len(prefix):]
                break
        if new.startswith("gen_vision_model."):
            for hf_part, ds_part in ((".block.", ".res."), (".mid.block_1.", ".mid.0."), (".mid.attn_1.", ".mid.1."),
                                     (".mid.block_2.", ".mid.2.")):
                new = new.replace(hf_part, ds_part)
        elif new.startswith("vision_model.vision_tower.blocks."):
            for hf_part, ds_part in ((".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
                                     (".self_attn.projection_layer.", ".attn.proj.")):
                new = new.replace(hf_part, ds_part)
            match = re.search(r"\.self_attn\.(q|k|v)_proj\.", new)
            if match:
                fused = new.replace(match.group(0), ".attn.qkv.")
                qkv.setdefault(fused, {})[match.group(1)] = tensor
                continue
        out[new] = tensor
    for fused, parts in qkv.items():
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def janus_config_from_deepseek(raw: dict, image_token_id: int, special: dict) -> "JanusConfig":
    """Translate DeepSeek's config.json (language/vision/aligner/gen_* sections) to a JanusConfig."""
    from transformers import JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    lang = dict(raw["language_config"])
    llama_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act")
    text = LlamaConfig(**{k: lang[k] for k in llama_keys if k in lang}, **special)
    vision = raw["vision_config"]["params"]
    aligner = raw["aligner_config"]["params"]
    gen_vision = raw["gen_vision_config"]["params"]
    gen_aligner = raw["gen_aligner_config"]["params"]
    gen_head = raw["gen_head_config"]["params"]
    # Real checkpoints name SigLIP-L/16 and VQ-16, whose sizes are transformers' defaults; tiny
    # checkpoints spell their sizes out with the extra keys read here.
    vision_cfg = JanusVisionConfig(
        image_size=vision.get("image_size", 384),
        **{hf: vision[ds] for ds, hf in (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                                         ("heads", "num_attention_heads"), ("patch_size", "patch_size"),
                                         ("mlp_ratio", "mlp_ratio")) if ds in vision},
        projection_dim=aligner["n_embed"],
        depth=aligner.get("depth", 2),
    )
    vq_cfg = JanusVQVAEConfig(
        embed_dim=gen_vision["n_embed"],
        num_embeddings=gen_vision["image_token_size"],
        projection_dim=gen_aligner["n_embed"],
        num_hidden_layers=gen_aligner.get("depth", 2),
        image_token_embed_dim=gen_head["image_token_embed"],
        **{k: gen_vision[k] for k in ("base_channels", "channel_multiplier", "latent_channels", "num_res_blocks")
           if k in gen_vision},
    )
    return JanusConfig(text_config=text, vision_config=vision_cfg, vq_config=vq_cfg, image_token_id=image_token_id,
                       tie_word_embeddings=False)


def deepseek_config_from_janus(config) -> dict:
    """DeepSeek's config.json for a JanusConfig (tiny checkpoints spell out their sizes)."""
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    return {
        "model_type": "multi_modality",
        "language_config": {k: getattr(text, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act")}
        | {"rope_theta": text.rope_parameters["rope_theta"] if getattr(text, "rope_parameters", None) else 10000.0},
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "image_size": vision.image_size, "model_name": "twig_tiny_vit", "select_feature": "same",
            "select_layer": -1, "width": vision.hidden_size, "layers": vision.num_hidden_layers,
            "heads": vision.num_attention_heads, "patch_size": vision.patch_size, "mlp_ratio": vision.mlp_ratio}},
        "aligner_config": {"cls": "MlpProjector", "params": {
            "depth": vision.depth, "input_dim": vision.hidden_size, "n_embed": vision.projection_dim,
            "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {
            "image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim, "base_channels": vq.base_channels,
            "channel_multiplier": list(vq.channel_multiplier), "latent_channels": vq.latent_channels,
            "num_res_blocks": vq.num_res_blocks}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {
            "depth": vq.num_hidden_layers, "input_dim": vq.embed_dim, "n_embed": vq.projection_dim,
            "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {
            "image_token_embed": vq.image_token_embed_dim, "image_token_size": vq.num_embeddings,
            "n_embed": vq.projection_dim}},
    }
