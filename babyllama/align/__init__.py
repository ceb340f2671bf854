"""Preference alignment after SFT: the reward model (`reward_model`), DPO (`dpo`) and PPO (`ppo`)."""
