"""Talking to a trained model: the interactive multi-turn chat behind `babyllama chat` and friends (`session`)."""
