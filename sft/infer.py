"""Chat with a fine-tuned checkpoint (default: the newest in out/<name>/sft), streaming each reply.

    python sft/infer.py                                   # interactive; /reset forgets, /exit quits
    python sft/infer.py --prompt "“床前明月光，疑是地上霜。”的下一句是什么？" --temperature 0
    python sft/infer.py --stage pretrain                  # or dpo, ppo; --ckpt PATH for any checkpoint file
    printf 'Who are you?\\nWho made you?\\n' | python sft/infer.py --show-prompt

All flags: python sft/infer.py --help (the chat itself lives in babyllama/chat/session.py).
"""
from __future__ import annotations

from babyllama.chat.session import main
from babyllama.cli import main_guard

if __name__ == "__main__":
    main_guard(lambda: main(__doc__, default_stages=("sft",)))
