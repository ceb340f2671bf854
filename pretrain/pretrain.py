"""Pretraining, the same job as `babyllama pretrain` (its code: babyllama/commands/pretrain.py).

    python pretrain/pretrain.py --name baby
    torchrun --nproc_per_node=4 pretrain/pretrain.py --name baby
    python pretrain/pretrain.py --help          # every flag with the value it takes
"""
from babyllama.cli import main_guard
from babyllama.commands.pretrain import main

if __name__ == "__main__":
    main_guard(main)
