"""translate: RNN attention models for neural machine translation."""

__version__ = "0.1.0"
