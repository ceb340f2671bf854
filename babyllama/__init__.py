"""babyllama: text -> tokenizer -> data -> pretrain -> SFT -> reward model -> RLHF -> chat, for LLaMA-style models."""
from babyllama.errors import UserError

__all__ = ["UserError"]
