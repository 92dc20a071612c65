"""Everything generation needs from one loaded checkpoint, in one object."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Janus's special tokens, spelled as in DeepSeek's tokenizer.
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"


@dataclass(frozen=True, slots=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int
    image: int
    boi: int
    eoi: int

    @classmethod
    def from_vocab(cls, vocab: dict[str, int]) -> "SpecialTokens":
        return cls(bos=vocab[BOS], eos=vocab[EOS], pad=vocab[PAD], image=vocab[IMAGE], boi=vocab[BOI], eoi=vocab[EOI])


@dataclass
class JanusBundle:
    model: torch.nn.Module  # transformers' JanusForConditionalGeneration
    tokenizer: object
    tokens: SpecialTokens
    ref: str
    layout: str
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def grid(self) -> int:
        """Image tokens per side (24 for Janus-Pro)."""
        return self.model.config.vq_config.num_patches

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model.config.vq_config.channel_multiplier) - 1)

    @property
    def image_px(self) -> int:
        return self.grid * self.downsample

    @property
    def vision_px(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def understanding_tokens(self) -> int:
        """Placeholder tokens one image takes in an understanding prompt."""
        patches = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        return patches * patches

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def embed_image_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(codes)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.generation_head(hidden)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
