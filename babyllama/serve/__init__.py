"""Serving a trained run over HTTP: an OpenAI-compatible API and a web chat page (`babyllama serve`).

    models.py    the run's loadable stages (pretrain, sft, dpo, ppo), each loaded on first use
    batcher.py   one decoding thread: requests that arrive together share the batched steps of `Generator`
    protocol.py  request validation and the OpenAI response / stream-chunk shapes
    app.py       the FastAPI app: routes, limits, API key, errors in OpenAI's schema
    static/      the chat page (no external resources)
"""
