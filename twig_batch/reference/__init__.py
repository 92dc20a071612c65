"""The reference tier: transformers' own forward over its dynamic cache, one image or prompt at a time.

Slow and obviously right; tests hold the fast engine and the batched pipeline to it token for token.
Nothing in the package imports it: it sits beside the pipeline and reads from it and the engine.
"""
