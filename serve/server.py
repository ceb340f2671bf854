"""The OpenAI-compatible server and chat page, as `babyllama serve` (babyllama/commands/serve.py).

    python serve/server.py --name baby --stage sft
"""
from babyllama.cli import main_guard
from babyllama.commands.serve import main

if __name__ == "__main__":
    main_guard(main)
