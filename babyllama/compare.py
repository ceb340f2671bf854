"""`python -m babyllama.compare`: the command keeps its name; the code is `babyllama.eval.compare`."""
import sys

from babyllama.cli import main_guard
from babyllama.eval.compare import main

if __name__ == "__main__":
    main_guard(lambda: sys.exit(main()))
