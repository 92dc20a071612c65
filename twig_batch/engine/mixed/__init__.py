"""The mixed loop: every image a program of stages, all of them in the same steps, KV in pages."""
