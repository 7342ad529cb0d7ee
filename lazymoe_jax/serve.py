r"""An OpenAI-compatible streaming server with continuous batching, and a page of live figures.

  python -m lazymoe_jax.serve [--model=STORE_DIR] [--host=127.0.0.1] [--port=8000] \
      [--parallel=8] [--max_queue=64] [--api_key=KEY] [--memory_budget_gb=8 | --expert_slots=N]

With no --model it serves the shipped demo model (converted into the cache on first use).
/health answers 503 while the model loads, then 200. Endpoints: POST /v1/chat/completions,
POST /v1/completions, GET /v1/models, GET /metrics, GET /stats, POST /tokenize, /detokenize,
GET / (the page).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from absl import app, flags

import lazymoe_jax
from lazymoe_jax import cli
from lazymoe_jax.errors import LazyMoEError, StoreError
from lazymoe_jax.server import templates
from lazymoe_jax.server.app import ServerState, create_app
from lazymoe_jax.server.scheduler import Scheduler
from lazymoe_jax.store import format as fmt

FLAGS = flags.FLAGS
log = logging.getLogger("lazymoe_jax.serve")


def define_flags() -> None:
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model", None, "Store folder (from checkpoints_tools.convert_hf). Default: "
                      "the shipped demo model.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_integer("parallel", 8, "Most sequences decoded together in one batch.")
  flags.DEFINE_integer("max_queue", 64, "Most requests waiting for a place; more get a 503.")
  flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens fed per step, between decode steps.")
  flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1/*, "
                      "/tokenize and /detokenize. Default: $LAZYMOE_API_KEY, else none.")
  flags.DEFINE_string("served_model_name", None, "Model id in /v1/models (default: the store "
                      "folder's name).")
  flags.DEFINE_string("chat_template", None, "A jinja chat template file to use instead of "
                      "the store's.")
  flags.DEFINE_float("sse_ping_s", 10.0, "Seconds between SSE keep-alive comments.")
  flags.DEFINE_bool("warmup", True, "Compile the programs before answering 200 on /health.")
  cli.define_engine_flags()


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8000, parallel: int = 8,
          max_queue: int = 64, prefill_chunk: int = 64, api_key: str | None = None,
          served_model_name: str | None = None, chat_template: str | None = None,
          sse_ping_s: float = 10.0, warmup: bool = True, **load_options) -> None:
  """Serves `model` (a store folder; None: the demo model) until interrupted. The HTTP server
  starts at once; the model loads on the engine thread meanwhile (/health is 503)."""
  import uvicorn  # pylint: disable=import-outside-toplevel

  if model is None:
    from checkpoints_tools import default_model  # pylint: disable=import-outside-toplevel
    log.warning("no --model: serving %s", default_model.DESCRIPTION)
    try:
      model = default_model.ensure_default_store(log.warning)
      fmt.read_manifest(model)
    except StoreError as e:  # a damaged cache is rebuilt once, never trusted
      log.warning("the cached demo store is damaged (%s); rebuilding it", e)
      model = default_model.ensure_default_store(log.warning, rebuild=True)
    name = served_model_name or default_model.NAME
  else:
    name = served_model_name or os.path.basename(os.path.normpath(model))
  manifest = fmt.read_manifest(model)  # fails now, with its clear message, on a bad folder
  if chat_template is not None and not os.path.isfile(chat_template):
    raise ValueError(f"--chat_template={chat_template} is not a file.")
  state: ServerState | None = None

  def load():
    # the memory plan holds the KV caches of --parallel sequences
    engine = lazymoe_jax.load(model, parallel=parallel, **load_options)
    if engine.plan is not None:
      log.warning("%s", engine.plan.describe())
    try:
      state.template = templates.load_store_template(model, manifest, engine.tokenizer,
                                                     chat_template)
      if state.template is None:
        state.template_error = ("its store carries no chat_template: the source had none, or "
                                "it was converted before templates were copied")
    except (OSError, templates.TemplateError) as e:
      state.template_error = f"its chat template cannot be used: {e}"
    if state.template_error:
      log.warning("chat completions disabled: %s", state.template_error)
    return engine

  scheduler = Scheduler(load, parallel=parallel, max_queue=max_queue,
                        prefill_chunk=prefill_chunk, warmup=warmup)
  state = ServerState(scheduler=scheduler, model_name=name,
                      api_key=api_key or os.environ.get("LAZYMOE_API_KEY") or None,
                      sse_ping_s=sse_ping_s)
  server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port,
                                         log_level="warning", access_log=False))
  scheduler.start()

  failed = []

  def stop_on_failure():  # a model that cannot load ends the server, with its message
    while not scheduler.ready.wait(0.2):
      if scheduler.load_error is not None:
        failed.append(scheduler.load_error)
        server.should_exit = True
        return
  threading.Thread(target=stop_on_failure, daemon=True).start()
  log.warning("listening on http://%s:%d (model %s)", host, port, name)
  server.run()
  scheduler.stop()
  if failed:
    e = failed[0]
    raise e if isinstance(e, (LazyMoEError, ValueError)) else LazyMoEError(
        f"loading the model failed: {type(e).__name__}: {e}")


def main(argv) -> None:
  del argv
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                      stream=sys.stderr)
  cli.run(lambda: serve(
      FLAGS.model, host=FLAGS.host, port=FLAGS.port, parallel=FLAGS.parallel,
      max_queue=FLAGS.max_queue, prefill_chunk=FLAGS.prefill_chunk, api_key=FLAGS.api_key,
      served_model_name=FLAGS.served_model_name, chat_template=FLAGS.chat_template,
      sse_ping_s=FLAGS.sse_ping_s, warmup=FLAGS.warmup, **cli.engine_options()))


if __name__ == "__main__":
  define_flags()
  app.run(main)
