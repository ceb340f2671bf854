"""The reward model, as `babyllama reward` (its code: babyllama/commands/reward.py).

    python reward/reward.py --name baby
"""
from babyllama.cli import main_guard
from babyllama.commands.reward import main

if __name__ == "__main__":
    main_guard(main)
