"""Supervised fine-tuning, as `babyllama sft` (its code: babyllama/commands/sft.py).

    python sft/sft.py --name baby
    torchrun --nproc_per_node=2 sft/sft.py --name baby
"""
from babyllama.cli import main_guard
from babyllama.commands.sft import main

if __name__ == "__main__":
    main_guard(main)
