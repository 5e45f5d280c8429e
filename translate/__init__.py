"""translate: RNN attention models for neural machine translation."""

import os

# oneDNN, which runs bf16 matrix products on CPU, keeps a compiled kernel for every tensor shape
# it meets (up to 1024 by default), and training and decoding meet many: that cache alone grew a
# 10-minute CPU training run by about 0.8 GB. 128 kernels hold the shapes that recur at the same
# speed (bench/peers, translate train). oneDNN reads this when it first runs, so it is set here,
# before any product; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

__version__ = "0.1.0"
