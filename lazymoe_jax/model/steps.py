"""The jitted programs the engine runs, cut at the router boundary.

A decode or prefill pass over one layer is: `attn_router` (or `dense_layer` for layers
without experts) -> host maps expert ids to pool slots, reading misses from disk ->
`moe_decode` (one token, its k experts fused) or `expert_scatter_add` per expert then
`moe_finish` (prefill and batched decode, tokens grouped by expert). The same compiled
program serves every layer of the same shape: layer indices are never static arguments.
Batched decode runs `attention_batch` once over the batch (the sequences' caches stacked, each
row at its own position) and `route_block` once over the batch. The router's ids come back with
the guesses for the layers ahead in one int32 array (`routed`), so a layer has one
device->host transfer; the expert programs take only the parameters they read (`shared`: the
shared expert's, if any), since a program's launch costs time per argument leaf (BUILD_NOTES
"Per-layer overhead").

When the pool holds every expert and the native kernels run, one decode token goes through
all layers in one program, `decode_step`: the router's ids pick slots from a device table and
the native expert kernel finds them in the pool's arena, so the step has no host round trip
(BUILD_NOTES "The whole decode step in one program"). `decode_batch_step` does the same for a
batch, each expert the batch picks run once over its rows (BUILD_NOTES "session 15").
"""

import functools

import jax
import jax.numpy as jnp

from lazymoe_jax import kernels
from lazymoe_jax.model import layers
from lazymoe_jax.model.routers import route
from lazymoe_jax.model.spec import DENSE_MLP, Moe, ModelSpec


@jax.jit
def embed(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows of a resident embedding table (a version 4 store's, or a tied float head); rows read
  from the store's table come as [T, H] float32 already (engine/weights.py)."""
  return jnp.take(table, ids, axis=0).astype(jnp.float32)  # [T, H]


@functools.partial(jax.jit, static_argnames=("spec",))
def head(spec: ModelSpec, g: dict, x: jax.Array) -> jax.Array:
  w = g["lm_head"] if "lm_head" in g else g["embed"]  # tied, version 4 store: the embedding
  return layers.linear(layers.rms_norm(x, g["final_norm"], spec.norm_eps), w)  # [T, V]


def _attention_residual(spec, kv, window, p, x, pos, cache, batched=False):
  a, cache = layers.attention(spec.attention, kv, p,
                              layers.rms_norm(x, p["attn_norm"], spec.norm_eps), pos, cache,
                              window, batched)
  h = x + a
  return h, layers.rms_norm(h, p["mlp_norm"], spec.norm_eps), cache


def _route(moe: Moe, p: dict, xn: jax.Array):
  return route(moe.router, layers.linear(xn, p["router"], p.get("router_bias")),
               p.get("router_score_bias"))


def _routed(spec: ModelSpec, ids: jax.Array, h: jax.Array, ahead: tuple) -> jax.Array:
  """int32 [1 + len(ahead), T, k]: this layer's expert ids, then the guesses of the routers of
  the next MoE layers (`ahead`, each its mlp_norm and router) applied to h, what a prefetcher
  can know before this layer's experts run: one array, one transfer to the host."""
  guesses = [_route(spec.moe, nxt, layers.rms_norm(h, nxt["mlp_norm"], spec.norm_eps))[0]
             for nxt in ahead]
  return jnp.stack([ids, *guesses])


@functools.partial(jax.jit, static_argnames=("spec", "kv", "window"),
                   donate_argnames=("cache",))
def attn_router(spec: ModelSpec, kv, window: int | None, p: dict, x: jax.Array,
                pos: jax.Array, cache: dict, ahead: tuple = ()):
  """Attention + residual + norm + router. Returns h, xn [T, H], routed [1 + len(ahead), T, k]
  (the ids, then the guesses for the layers `ahead`: see _routed), weights [T, k], cache."""
  h, xn, cache = _attention_residual(spec, kv, window, p, x, pos, cache)
  ids, weights = _route(spec.moe, p, xn)
  return h, xn, _routed(spec, ids, h, ahead), weights, cache


@functools.partial(jax.jit, static_argnames=("spec", "kv", "window"),
                   donate_argnames=("cache",))
def attention_batch(spec: ModelSpec, kv, window: int | None, p: dict, x: jax.Array,
                    pos: jax.Array, cache: dict):
  """Attention + residual + norm of N sequences, one token each: x [N, H] at positions pos
  [N], cache the stack of their caches (leading axis N, updated in place). Returns h, xn
  [N, H], cache (batched decode: one program per layer for the whole batch)."""
  return _attention_residual(spec, kv, window, p, x, pos, cache, batched=True)


@functools.partial(jax.jit, static_argnames=("spec",))
def route_block(spec: ModelSpec, p: dict, h: jax.Array, xn: jax.Array, ahead: tuple = ()):
  """The router over a batch's rows: routed [1 + len(ahead), N, k] (see _routed), weights."""
  ids, weights = _route(spec.moe, p, xn)
  return _routed(spec, ids, h, ahead), weights


@functools.partial(jax.jit, static_argnames=("spec",))
def dense_mlp(spec: ModelSpec, p: dict, h: jax.Array, xn: jax.Array):
  """The residual MLP of a layer whose MLP is dense (given h and its norm xn)."""
  del spec
  return h + layers.swiglu(p["w_gate_up"], p["w_down"], xn)


@functools.partial(jax.jit, static_argnames=("spec", "kv", "window"),
                   donate_argnames=("cache",))
def dense_layer(spec: ModelSpec, kv, window: int | None, p: dict, x: jax.Array,
                pos: jax.Array, cache: dict):
  """A whole layer whose MLP is dense (Qwen `mlp_only_layers`, DeepSeek's first layers)."""
  h, xn, cache = _attention_residual(spec, kv, window, p, x, pos, cache)
  return h + layers.swiglu(p["w_gate_up"], p["w_down"], xn), cache


def shared_params(p: dict) -> dict:
  """The part of a layer's params the expert programs read: the shared expert's (`shared_*`)."""
  return {k: v for k, v in p.items() if k.startswith("shared_")}


def _shared(moe: Moe, p: dict, xn: jax.Array) -> jax.Array:
  if not moe.shared_width:
    return jnp.zeros_like(xn)
  out = layers.swiglu(p["shared_w_gate_up"], p["shared_w_down"], xn)
  if not moe.shared_gate:  # DeepSeek: shared experts always count in full
    return out
  return jax.nn.sigmoid(layers.linear(xn, p["shared_gate"])) * out  # gate [T, 1]


@functools.partial(jax.jit, static_argnames=("spec",))
def moe_decode(spec: ModelSpec, shared: dict, h: jax.Array, xn: jax.Array, weights: jax.Array,
               slots: tuple) -> jax.Array:
  """One token: slots[j] = {tensor: Weight} of its j-th expert; weights [1, k]; shared: the
  layer's shared_params. The native kernels take all k experts in one call where they serve
  the encoding."""
  p = shared
  enc = slots[0]["w_gate_up"].encoding.name
  if kernels.native_for(enc, xn.shape[0]):
    return h + (_native_experts(spec, enc, slots, xn, weights) + _shared(spec.moe, p, xn))
  routed = jnp.zeros_like(xn)
  for j, ex in enumerate(slots):
    # A barrier per expert: otherwise XLA shares the broadcast activation between the experts'
    # products and materialises it (BUILD_NOTES "Measurements moved out of the code").
    xj, ex = jax.lax.optimization_barrier((xn, ex))
    routed = routed + weights[:, j:j + 1] * layers.expert_ffn(spec.moe.act, ex, xj)
  return h + (routed + _shared(spec.moe, p, xn))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("acc",))
def expert_scatter_add(spec: ModelSpec, acc: jax.Array, xn: jax.Array, idx: jax.Array,
                       w: jax.Array, ex: dict) -> jax.Array:
  """acc[idx] += w * expert(xn[idx]). idx, w [B] are padded with weight 0 to a bucket size."""
  x = jnp.take(xn, idx, axis=0)
  enc = ex["w_gate_up"].encoding.name
  if kernels.native_for(enc, x.shape[0]):
    return acc.at[idx].add(_native_experts(spec, enc, (ex,), x, w[:, None]))
  y = layers.expert_ffn(spec.moe.act, ex, x)
  return acc.at[idx].add(y * w[:, None])


def _native_experts(spec: ModelSpec, enc: str, experts: tuple, x: jax.Array,
                    weights: jax.Array) -> jax.Array:
  """sum_j weights[:, j] * expert_j(x) in one native call (kernels.moe_ffn)."""
  act = spec.moe.act
  return kernels.moe_ffn(enc, tuple({t: w.arrays for t, w in ex.items()} for ex in experts),
                         x, weights, (act.kind, act.alpha, act.limit))


@functools.partial(jax.jit, static_argnames=("spec", "encoding", "layout"),
                   donate_argnames=("acc",))
def experts_pooled_add(spec: ModelSpec, encoding: str, layout: tuple, acc: jax.Array,
                       xn: jax.Array, slots: jax.Array, weights: jax.Array,
                       arena: jax.Array) -> jax.Array:
  """acc + each row's picks through the pool's experts found by slot (slots, weights [T, k],
  -1: none; kernels.moe_ffn_pooled), each expert run once over its rows, the picks added onto
  acc in their order: what expert_scatter_add per expert adds, in one call (a wave of
  Forward._moe_grouped)."""
  act = spec.moe.act
  return kernels.moe_ffn_pooled(encoding, arena, layout, slots, xn, weights,
                                (act.kind, act.alpha, act.limit), init=acc)


@functools.partial(jax.jit, static_argnames=("spec",))
def moe_finish(spec: ModelSpec, shared: dict, h: jax.Array, xn: jax.Array, routed: jax.Array):
  """h + routed + the shared experts (shared: the layer's shared_params)."""
  return h + (routed + _shared(spec.moe, shared, xn))


@functools.partial(jax.jit, static_argnames=("spec", "kv", "encoding", "layout"),
                   donate_argnames=("caches",))
def decode_step(spec: ModelSpec, kv, encoding: str, layout: tuple, ps: tuple, table: jax.Array,
                arena: jax.Array, x: jax.Array, pos: jax.Array, caches: tuple):
  """One token through every layer, every expert resident: the same operations as
  attn_router / dense_layer then moe_decode layer by layer, but the slots of the router's
  ids are looked up in `table` (int32 [MoE layers, experts], ExpertPool.slot_table) and the
  experts read from the pool's `arena` by kernels.moe_ffn_pooled. ps: every layer's params;
  layout: ExpertPool.layout(); x [1, H]. Returns (x, caches)."""
  width, slot_bytes, offsets = layout
  act = spec.moe.act
  caches = list(caches)
  m = 0
  for layer, p in enumerate(ps):
    window = spec.layers[layer].window
    if spec.layers[layer].mlp == DENSE_MLP:
      x, caches[layer] = dense_layer(spec, kv, window, p, x, pos, caches[layer])
      continue
    h, xn, caches[layer] = _attention_residual(spec, kv, window, p, x, pos, caches[layer])
    ids, weights = _route(spec.moe, p, xn)
    routed = kernels.moe_ffn_pooled(encoding, arena, (width, slot_bytes, offsets),
                                    table[m, ids[0]], xn, weights, (act.kind, act.alpha, act.limit))
    x = h + (routed + _shared(spec.moe, shared_params(p), xn))
    m += 1
  return x, tuple(caches)


@functools.partial(jax.jit, static_argnames=("spec", "kv", "encoding", "layout"),
                   donate_argnames=("stack",))
def decode_batch_step(spec: ModelSpec, kv, encoding: str, layout: tuple, ps: tuple,
                      table: jax.Array, arena: jax.Array, x: jax.Array, pos: jax.Array,
                      live: jax.Array, stack: tuple):
  """One decode token of each of N sequences through every layer, every expert resident: the
  same operations as attention_batch, route_block (or dense_mlp) and the grouped experts then
  moe_finish layer by layer, in one program. Each row's picks go in ascending expert order,
  the order the layer loop adds them in (results equal it bit for bit), as slots of `table`
  (decode_step) to kernels.moe_ffn_pooled, which runs each expert the batch picks once over
  its rows; rows not `live` (bool [N], padding) pick none. x [N, H], pos [N], stack: every
  layer's stacked caches (engine/batch.py). Returns (x, stack, experts: int32 [MoE layers],
  the distinct experts each layer ran: the acquires the layer loop would have made)."""
  act = spec.moe.act
  stack = list(stack)
  experts = []
  m = 0
  for layer, p in enumerate(ps):
    window = spec.layers[layer].window
    h, xn, stack[layer] = _attention_residual(spec, kv, window, p, x, pos, stack[layer],
                                              batched=True)
    if spec.layers[layer].mlp == DENSE_MLP:
      x = h + layers.swiglu(p["w_gate_up"], p["w_down"], xn)
      continue
    ids, weights = _route(spec.moe, p, xn)
    order = jnp.argsort(ids, axis=1)
    ids = jnp.take_along_axis(ids, order, axis=1)
    weights = jnp.take_along_axis(weights, order, axis=1)
    slots = table[m][ids]
    # -1 is the kernel's "no expert" (padding rows); an expert the table does not hold (-1
    # there too, which holds_all rules out) becomes a slot the kernel refuses, never a skip
    slots = jnp.where(live[:, None], jnp.where(slots < 0, jnp.iinfo(jnp.int32).max, slots), -1)
    routed = kernels.moe_ffn_pooled(encoding, arena, layout, slots, xn, weights,
                                    (act.kind, act.alpha, act.limit))
    x = h + (routed + _shared(spec.moe, shared_params(p), xn))
    picked = jnp.zeros(spec.num_experts, jnp.int32).at[ids].max(live[:, None].astype(jnp.int32))
    experts.append(picked.sum())
    m += 1
  return x, tuple(stack), jnp.stack(experts)
