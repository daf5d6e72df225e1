"""``python -m ccat`` and ``torchrun -m ccat``."""

from ccat.cli import main

main()
