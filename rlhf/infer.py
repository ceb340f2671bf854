"""Chat with an RLHF-tuned checkpoint (default: the newest of out/<name>/ppo, else out/<name>/dpo).

    python rlhf/infer.py                                  # interactive; /reset forgets, /exit quits
    python rlhf/infer.py --stage dpo --prompt "Who are you?"
    python rlhf/infer.py --stage sft                      # compare with the model before RLHF

All flags: python rlhf/infer.py --help (the chat itself lives in babyllama/chat/session.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from babyllama.chat.session import main  # noqa: E402
from babyllama.cli import main_guard  # noqa: E402

if __name__ == "__main__":
    main_guard(lambda: main(__doc__, default_stages=("ppo", "dpo")))
