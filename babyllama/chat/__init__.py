"""Talking to a trained model: the interactive multi-turn chat behind `sft/infer.py` and friends (`session`)."""
