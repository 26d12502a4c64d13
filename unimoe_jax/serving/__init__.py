"""Serving a checkpoint outside the training loops: prompts from text and media files
(`prompting`), token log-probabilities (`scoring`) and answers decoded over the KV cache
(`answering`). `python -m unimoe_jax.score` and `python -m unimoe_jax.generate` are the command
lines over them (their flags: `flags`)."""
