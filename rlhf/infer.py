"""Chat with an RLHF-tuned checkpoint (default: the newest of out/<name>/ppo, else out/<name>/dpo).

    python rlhf/infer.py                                  # interactive; /reset forgets, /exit quits
    python rlhf/infer.py --stage dpo --prompt "Who are you?"
    python rlhf/infer.py --stage sft                      # compare with the model before RLHF

All flags: python rlhf/infer.py --help (the chat itself lives in babyllama/chat/session.py).
"""
from __future__ import annotations

from babyllama.chat.session import main
from babyllama.cli import main_guard

if __name__ == "__main__":
    main_guard(lambda: main(__doc__, default_stages=("ppo", "dpo")))
