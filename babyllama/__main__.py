"""`python -m babyllama <job>` is the `babyllama` command (what `torchrun -m babyllama <job>` runs)."""
from babyllama.commands import main

main()
