"""`python -m tunesmith.cli` (how `accelerate launch -m tunesmith.cli` and `--nproc` start each process)."""

from .commands import main

main()
