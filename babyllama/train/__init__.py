"""Training: the Keras-like `Trainer` (`trainer`) and its `callbacks`, full-state `checkpoint`s, `distributed`
setup, the optimizer and schedule (`optim`), run presets and output paths (`run_config`), the plumbing every
stage script shares (`stage`), the run record (`run_record`) and peak FLOP/s for MFU (`flops`)."""
