"""`python -m babyllama.evaluate`: the command keeps its name; the code is `babyllama.eval.evaluate`."""
from babyllama.cli import main_guard
from babyllama.eval.evaluate import main

if __name__ == "__main__":
    main_guard(main)
