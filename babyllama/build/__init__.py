"""Builders of the shipped data sets (data/corpus, data/sft, data/preference, data/eval): `babyllama data build`."""
