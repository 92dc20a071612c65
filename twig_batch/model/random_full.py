"""Janus-Pro-sized models with random weights, for speed measurements and GPU smoke runs.

Random weights cost exactly the compute of real ones. The tokenizer is the tiny offline one (its
ids fit in any vocabulary); the language model keeps Janus-Pro's full 102,400-token vocabulary.
"""
from __future__ import annotations

import torch

from twig_batch.model.building import build_model
from twig_batch.model.bundle import JanusBundle, SpecialTokens

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
}


def random_janus(size: str, device, dtype: torch.dtype, seed: int = 0) -> JanusBundle:
    from transformers import JanusConfig, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    from twig_batch.model.tiny import train_tiny_tokenizer

    dims = SIZES[size.lower()]
    tokenizer = train_tiny_tokenizer()
    special = SpecialTokens.from_vocab(tokenizer.get_vocab())
    text = LlamaConfig(vocab_size=102400, num_key_value_heads=dims["num_attention_heads"],
                       max_position_embeddings=16384, rms_norm_eps=1e-6, bos_token_id=special.bos,
                       eos_token_id=special.eos, pad_token_id=special.pad, **dims)
    vision = JanusVisionConfig(projection_dim=dims["hidden_size"])
    vq = JanusVQVAEConfig(projection_dim=dims["hidden_size"], image_token_embed_dim=dims["hidden_size"])
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=special.image,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = build_model(config, special, device, dtype, init_weights=True)
    return JanusBundle(model=model, tokenizer=tokenizer, tokens=special, ref=f"random-{size.lower()}",
                       layout="random")
