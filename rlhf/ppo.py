"""RLHF with PPO, as `babyllama ppo` (its code: babyllama/commands/ppo.py).

    python rlhf/ppo.py --name baby
"""
from babyllama.cli import main_guard
from babyllama.commands.ppo import main

if __name__ == "__main__":
    main_guard(main)
