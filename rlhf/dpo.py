"""DPO, as `babyllama dpo` (its code: babyllama/commands/dpo.py).

    python rlhf/dpo.py --name baby
"""
from babyllama.cli import main_guard
from babyllama.commands.dpo import main

if __name__ == "__main__":
    main_guard(main)
