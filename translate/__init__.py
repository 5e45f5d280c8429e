"""translate: RNN attention models for neural machine translation."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

MIN_TORCH = (2, 4)  # torch.get_autocast_dtype, device-typed autocast queries, torch.amp.GradScaler("cuda")


def _release(text: str) -> tuple[int, ...]:
    """(2, 13) of "2.13.0+cpu"; what comes after the first two numbers does not matter here."""
    numbers = []
    for part in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


try:  # read from the installed metadata, without importing torch
    _torch = version("torch")
except PackageNotFoundError:
    _torch = None
if _torch is not None and _release(_torch) < MIN_TORCH:
    raise ImportError(f"translate needs torch >= {'.'.join(map(str, MIN_TORCH))}, found {_torch}; "
                      f"upgrade it: pip install -U torch")
