"""Measuring models and runs: held-out loss / bits per byte and cloze accuracy (`evaluate`), chat multiple
choice (`choice`), the before/after numbers of the RLHF stages (`heldout`), and a run against the published one
(`compare`)."""
