"""What training and evaluation read: corpus files (`corpus`), the tokenizer, pretraining token bins and their
sampler (`token_bins`), the ChatML template (`chat_template`), SFT conversations (`sft`) and preference pairs
(`preference`), all from one JSON-lines reader (`jsonl`)."""
