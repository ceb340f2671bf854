"""RL with verifiable rewards (GRPO) on the skill suite, as `babyllama grpo` (its code: babyllama/commands/grpo.py).

    python rlhf/grpo.py --name baby
"""
from babyllama.cli import main_guard
from babyllama.commands.grpo import main

if __name__ == "__main__":
    main_guard(main)
