"""``python -m translate`` (and ``torchrun -m translate``) run the command line."""

from .cli import main

main()
