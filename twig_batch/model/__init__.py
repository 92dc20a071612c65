"""Janus-Pro loading: the transformers layout, DeepSeek's original layout, and tiny offline models."""
from twig_batch.model.bundle import JanusBundle, SpecialTokens
from twig_batch.model.loading import load_janus

__all__ = ["JanusBundle", "SpecialTokens", "load_janus"]
