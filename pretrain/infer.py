"""Continue text with a pretrained checkpoint, as `babyllama generate` (babyllama/commands/generate.py).

    python pretrain/infer.py --prompt "床前明月光，"
    python pretrain/infer.py                  # one prompt per line
"""
from babyllama.cli import main_guard
from babyllama.commands.generate import main

if __name__ == "__main__":
    main_guard(main)
