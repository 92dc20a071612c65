"""Janus-Pro loading: the transformers layout, DeepSeek's original layout, and tiny offline models.

`checkpoint.py` tells what a model reference names from its files alone, without torch (the batch
driver's checks); everything else here loads torch, on first use.
"""
from twig_batch.first_use import names_on_first_use

__all__ = ["JanusBundle", "SpecialTokens", "load_janus"]
__getattr__ = names_on_first_use(globals(), {"JanusBundle": "twig_batch.model.bundle",
                                             "SpecialTokens": "twig_batch.model.bundle",
                                             "load_janus": "twig_batch.model.loading"})
