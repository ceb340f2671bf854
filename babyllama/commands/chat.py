"""Chat with a checkpoint in the terminal (default: the newest of out/<name>/sft), streaming each reply.

    babyllama chat                                    # interactive; /reset forgets, /exit quits
    babyllama chat --prompt "“床前明月光，疑是地上霜。”的下一句是什么？" --temperature 0
    babyllama chat --stage ppo                        # or pretrain, dpo; --ckpt PATH for any checkpoint file
    printf 'Who are you?\\nWho made you?\\n' | babyllama chat --show-prompt

The chat itself lives in babyllama/chat/session.py.
"""
from __future__ import annotations

from babyllama.chat import session


def main(argv: list[str] | None = None) -> None:
    session.main(__doc__, default_stages=("sft",), argv=argv)
