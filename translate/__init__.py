"""translate: RNN attention models for neural machine translation."""

import os

# oneDNN, which runs bf16 matrix products on CPU, keeps a compiled kernel for every tensor shape
# it meets (up to 1024 by default), and training and decoding meet many: with 128, a 10-minute
# CPU training run in bench/peers peaked at 1,738 MB instead of 2,352 MB, at about the same speed
# (4,016 against 4,144 target tokens/s). oneDNN reads this when it first runs, so it is set here,
# before any product; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
# PyTorch's oneDNN glue (ideep) keeps its own cache of RNN and matrix-product set-ups, with their
# weights in oneDNN's layout, per tensor shape (up to 1,024). Bounded to 128 as well, a 1-minute
# bf16 CPU run in bench/peers peaked at 1,119 MB instead of 1,406 MB, at the same speed.
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

__version__ = "0.1.0"
