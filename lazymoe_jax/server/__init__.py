"""The OpenAI-compatible server behind `python -m lazymoe_jax.serve`.

app.py (HTTP endpoints) -> scheduler.py (the engine thread: continuous batching on the engine's
public step API) ; protocol.py (request validation, OpenAI shapes) ; templates.py (chat
templates rendered as transformers does, harmony output) ; static/index.html (the page).
"""
