"""A zoo of small models for tests, notebooks and benchmarks.

Every model is a :class:`ZooModel`: a pure function ``fn(params, inputs) ->
outputs`` together with concrete random ``params`` and ``inputs``, the feature
spec naming the input features, and ``singles``: the parameter leaves whose
elements each meet at most one named input feature (by the first-contact rule:
rows of the first dense kernel, per-input-channel slices of the first conv
kernel, per-feature normalisation statistics, embedding tables gathered by one
categorical feature). Parameter leaf paths are
``jax.tree_util.keystr(path, simple=True, separator="/")`` over ``params``;
NNX states end in ``/value`` (e.g. ``"layers/0/kernel/value"``).

Usage::

    import zoo                      # with tests/ on sys.path
    m = zoo.get("mlp_relu")
    out = m.fn(m.params, m.inputs)
    abstract_params, abstract_inputs = zoo.abstract(m)

All parameters are random (``normal * 0.5``; variances and stds are
``exp(normal * 0.5)``), so there are no structural zeros. Models are built
deterministically from ``seed`` and the model name, so ``get(name, seed)``
equals ``zoo(seed)[name]``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxsurgery as js

__all__ = ["ZooModel", "zoo", "get", "abstract", "names", "keystr", "param_paths"]

BATCH = 2


@dataclasses.dataclass(frozen=True)
class ZooModel:
  """A pure model function with concrete params, inputs and feature spec."""

  name: str
  fn: Callable
  params: Any
  inputs: Any
  features: Any
  singles: tuple[str, ...]
  source: str  # "plain", "nnx" or "linen"
  notes: str = ""


# ----------------------------------------------------------------------------
# Helpers


def keystr(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def param_paths(params: Any) -> list[str]:
  """The keystr paths of all leaves of a params tree."""
  return [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _names(prefix: str, n: int) -> list[str]:
  return [f"{prefix}{i}" for i in range(n)]


class _Rng:
  """Deterministic numpy random source for one model (cheap: no jax compiles)."""

  def __init__(self, seed: int, name: str):
    self._gen = np.random.default_rng([seed, zlib.crc32(name.encode())])

  def normal(self, shape, scale=0.5) -> jax.Array:
    return jnp.asarray(scale * self._gen.standard_normal(shape), jnp.float32)

  def positive(self, shape) -> jax.Array:
    return jnp.exp(self.normal(shape))

  def ints(self, shape, high: int) -> jax.Array:
    return jnp.asarray(self._gen.integers(0, high, shape), jnp.int32)

  def dense(self, n_in: int, n_out: int) -> dict[str, jax.Array]:
    return {"kernel": self.normal((n_in, n_out)), "bias": self.normal((n_out,))}

  def randomize(self, tree, positive: Callable[[str], bool] = lambda path: False):
    """Replaces every float leaf (array or ShapeDtypeStruct) by random values."""
    def fill(path, x):
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"Cannot randomize non-float leaf {keystr(path)!r} ({x.dtype}).")
      return self.positive(x.shape) if positive(keystr(path)) else self.normal(x.shape)
    return jax.tree_util.tree_map_with_path(fill, tree)


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _nnx_params(make_module: Callable[[nnx.Rngs], nnx.Module], rng: _Rng):
  """Builds an NNX module abstractly; returns (graphdef, random Param state, rest)."""
  module = nnx.eval_shape(lambda: make_module(nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("Zoo NNX models must hold only nnx.Param state.")
  return graphdef, rng.randomize(params), rest


def _linen_variables(module: nn.Module, *args, rng: _Rng, **kwargs):
  """Abstract linen init, then random values for every variable."""
  variables = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
  return rng.randomize(variables, positive=lambda path: path.endswith("/var"))


# ----------------------------------------------------------------------------
# Plain MLPs


def _mlp(rng: _Rng, name: str, activation: Callable) -> ZooModel:
  F, H, O = 5, 8, 3
  params = {"dense1": rng.dense(F, H), "dense2": rng.dense(H, H), "out": rng.dense(H, O)}

  def fn(params, inputs):
    h = activation(_dense(params["dense1"], inputs["obs"]))
    h = activation(_dense(params["dense2"], h))
    return _dense(params["out"], h)

  return ZooModel(
      name=name, fn=fn, params=params,
      inputs={"obs": rng.normal((BATCH, F), 1.0)},
      features={"obs": js.Features(_names("obs", F))},
      singles=("dense1/kernel",), source="plain",
      notes=f"Plain 2-hidden-layer MLP with {activation.__name__}.")


def mlp_relu(rng: _Rng) -> ZooModel:
  return _mlp(rng, "mlp_relu", jax.nn.relu)


def mlp_tanh(rng: _Rng) -> ZooModel:
  return _mlp(rng, "mlp_tanh", jnp.tanh)


def mlp_gelu(rng: _Rng) -> ZooModel:
  return _mlp(rng, "mlp_gelu", jax.nn.gelu)


# ----------------------------------------------------------------------------
# Flax MLPs


class _NnxMLP(nnx.Module):

  def __init__(self, sizes, rngs):
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def mlp_nnx(rng: _Rng) -> ZooModel:
  F = 4
  graphdef, params, rest = _nnx_params(lambda rngs: _NnxMLP([F, 8, 8, 2], rngs), rng)

  def fn(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  return ZooModel(
      name="mlp_nnx", fn=fn, params=params,
      inputs=rng.normal((BATCH, F), 1.0),
      features=js.Features(["speed", "angle", "height", "fuel"]),
      singles=("layers/0/kernel/value",), source="nnx",
      notes="nnx.Linear layers in an nnx.List; inputs is a bare array.")


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6, name="hidden1")(x))
    x = nn.relu(nn.Dense(6, name="hidden2")(x))
    return nn.Dense(2, name="out")(x)


def mlp_linen(rng: _Rng) -> ZooModel:
  F = 3
  module = _LinenMLP()
  x = rng.normal((BATCH, F), 1.0)
  params = _linen_variables(module, x, rng=rng)["params"]

  def fn(params, x):
    return module.apply({"params": params}, x)

  return ZooModel(
      name="mlp_linen", fn=fn, params=params, inputs=x,
      features=js.Features(["a", "b", "c"]),
      singles=("hidden1/kernel",), source="linen",
      notes="linen nn.Dense MLP (tanh, relu); inputs is a bare array.")


# ----------------------------------------------------------------------------
# Conv net


def convnet(rng: _Rng) -> ZooModel:
  C, H1, H2, O, groups = 3, 8, 8, 4, 2
  params = {
      "conv1": {"kernel": rng.normal((3, 3, C, H1)), "bias": rng.normal((H1,))},
      "conv2": {"kernel": rng.normal((3, 3, H1 // groups, H2)), "bias": rng.normal((H2,))},
      "out": rng.dense(2 * 2 * H2, O),
  }
  dn = ("NHWC", "HWIO", "NHWC")

  def fn(params, inputs):
    x = inputs["image"]                                               # (B, 8, 8, C)
    x = jax.lax.conv_general_dilated(
        x, params["conv1"]["kernel"], window_strides=(2, 2), padding="SAME",
        dimension_numbers=dn) + params["conv1"]["bias"]                # (B, 4, 4, H1)
    x = jax.nn.relu(x)
    x = jax.lax.conv_general_dilated(
        x, params["conv2"]["kernel"], window_strides=(1, 1), padding=((0, 0), (1, 1)),
        feature_group_count=groups, dimension_numbers=dn) + params["conv2"]["bias"]
    x = jax.nn.relu(x)                                                # (B, 2, 4, H2)
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 1), (1, 1, 2, 1),
                              "VALID")                                 # (B, 2, 2, H2)
    return _dense(params["out"], x.reshape(x.shape[0], -1))

  return ZooModel(
      name="convnet", fn=fn, params=params,
      inputs={"image": rng.normal((BATCH, 8, 8, C), 1.0)},
      features={"image": js.Features(["red", "green", "blue"], axis=3)},
      singles=("conv1/kernel",), source="plain",
      notes="lax.conv NHWC/HWIO: stride-2 SAME conv, grouped conv (2 groups) with "
            "asymmetric padding, 1x2 max-pool, flatten, dense.")


# ----------------------------------------------------------------------------
# Embeddings


def embedding(rng: _Rng) -> ZooModel:
  F, NH, DH, NI, DI, H, O = 4, 5, 4, 7, 3, 8, 3
  params = {
      "hero_embed": rng.normal((NH, DH)),
      "item_embed": rng.normal((NI, DI)),
      "dense1": rng.dense(DH + DI + F, H),
      "out": rng.dense(H, O),
  }

  def fn(params, inputs):
    hero = jnp.take(params["hero_embed"], inputs["hero_id"], axis=0)   # (B, DH)
    items = params["item_embed"][inputs["item_ids"]].sum(axis=1)       # (B, DI)
    x = jnp.concatenate([hero, items, inputs["obs"]], axis=-1)
    h = jax.nn.relu(_dense(params["dense1"], x))
    return _dense(params["out"], h)

  inputs = {
      "hero_id": rng.ints((BATCH,), NH),
      "item_ids": rng.ints((BATCH, 3), NI),
      "obs": rng.normal((BATCH, F), 1.0),
  }
  return ZooModel(
      name="embedding", fn=fn, params=params, inputs=inputs,
      features={"hero_id": "hero", "item_ids": "items",
                "obs": js.Features(["hp", "mana", "gold", "level"])},
      singles=("hero_embed", "item_embed", "dense1/kernel"), source="plain",
      notes="jnp.take and fancy-index gathers, sum over items, concat with dense "
            "features; each row of dense1/kernel reads one feature.")


# ----------------------------------------------------------------------------
# Normalisation layers


class _NnxLayerNormMLP(nnx.Module):

  def __init__(self, F, H, O, rngs):
    self.linear1 = nnx.Linear(F, H, rngs=rngs)
    self.norm = nnx.LayerNorm(H, rngs=rngs)
    self.linear2 = nnx.Linear(H, O, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.norm(self.linear1(x))))


def layernorm(rng: _Rng) -> ZooModel:
  F = 5
  graphdef, params, rest = _nnx_params(lambda rngs: _NnxLayerNormMLP(F, 6, 2, rngs), rng)

  def fn(params, inputs):
    return nnx.merge(graphdef, params, rest)(inputs["obs"])

  return ZooModel(
      name="layernorm", fn=fn, params=params,
      inputs={"obs": rng.normal((BATCH, F), 1.0)},
      features={"obs": js.Features(_names("f", F))},
      singles=("linear1/kernel/value",), source="nnx",
      notes="nnx Linear -> LayerNorm(scale, bias) -> relu -> Linear.")


class _LinenBatchNormMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True, name="in_norm")(x)
    x = nn.Dense(6, name="dense1")(x)
    x = nn.BatchNorm(use_running_average=True, name="hidden_norm")(x)
    return nn.Dense(2, name="out")(nn.relu(x))


def batchnorm(rng: _Rng) -> ZooModel:
  F = 4
  module = _LinenBatchNormMLP()
  x = rng.normal((BATCH, F), 1.0)
  params = _linen_variables(module, x, rng=rng)

  def fn(params, x):
    return module.apply(params, x)

  return ZooModel(
      name="batchnorm", fn=fn, params=params, inputs=x,
      features=js.Features(["x", "y", "vx", "vy"]),
      singles=("batch_stats/in_norm/mean", "batch_stats/in_norm/var",
               "params/in_norm/bias", "params/in_norm/scale", "params/dense1/kernel"),
      source="linen",
      notes="linen BatchNorm in inference mode; params is the whole variables dict "
            "{'params', 'batch_stats'} so running mean/var are parameters. The input "
            "BatchNorm is per feature, so its vectors and dense1/kernel are singles.")


# ----------------------------------------------------------------------------
# Attention


class _NnxAttention(nnx.Module):

  def __init__(self, F, O, rngs):
    self.attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=F, qkv_features=8, decode=False, rngs=rngs)
    self.head = nnx.Linear(F, O, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return self.head(x.mean(axis=1))


def attention(rng: _Rng) -> ZooModel:
  F, S = 4, 5
  graphdef, params, rest = _nnx_params(lambda rngs: _NnxAttention(F, 3, rngs), rng)

  def fn(params, inputs):
    return nnx.merge(graphdef, params, rest)(inputs["tokens"])

  return ZooModel(
      name="attention", fn=fn, params=params,
      inputs={"tokens": rng.normal((BATCH, S, F), 1.0)},
      features={"tokens": js.Features(["pos_x", "pos_y", "size", "colour"])},
      singles=("attn/key/kernel/value", "attn/query/kernel/value", "attn/value/kernel/value"),
      source="nnx",
      notes="nnx.MultiHeadAttention (2 heads x 4, kernels shaped (in, heads, head_dim)) "
            "self-attention over 5 tokens, residual, mean-pool, linear head.")


# ----------------------------------------------------------------------------
# Recurrent


class _LinenLSTM(nn.Module):
  hidden: int = 6

  @nn.compact
  def __call__(self, x):
    zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    h = nn.RNN(nn.OptimizedLSTMCell(self.hidden, name="lstm"))(x, initial_carry=(zeros, zeros))
    return nn.Dense(3, name="head")(h[:, -1])


def lstm(rng: _Rng) -> ZooModel:
  F, T = 5, 4
  module = _LinenLSTM()
  x = rng.normal((BATCH, T, F), 1.0)
  params = _linen_variables(module, x, rng=rng)["params"]

  def fn(params, x):
    return module.apply({"params": params}, x)

  return ZooModel(
      name="lstm", fn=fn, params=params, inputs=x,
      features=js.Features(_names("s", F)),
      singles=("lstm/if/kernel", "lstm/ig/kernel", "lstm/ii/kernel", "lstm/io/kernel"),
      source="linen",
      notes="linen nn.RNN(OptimizedLSTMCell) over time (lax.scan) from a zero carry, "
            "dense head on the last output. The cell concatenates its ii/if/ig/io "
            "(and hi/hf/hg/ho) kernels before one matmul.")


class _NnxGRU(nnx.Module):

  def __init__(self, F, H, O, rngs):
    self.hidden = H
    self.rnn = nnx.RNN(nnx.GRUCell(F, H, rngs=rngs), rngs=False)
    self.head = nnx.Linear(H, O, rngs=rngs)

  def __call__(self, x):
    carry = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    return self.head(self.rnn(x, initial_carry=carry)[:, -1])


def gru(rng: _Rng) -> ZooModel:
  F, T = 3, 4
  graphdef, params, rest = _nnx_params(lambda rngs: _NnxGRU(F, 5, 2, rngs), rng)

  def fn(params, inputs):
    return nnx.merge(graphdef, params, rest)(inputs["seq"])

  return ZooModel(
      name="gru", fn=fn, params=params,
      inputs={"seq": rng.normal((BATCH, T, F), 1.0)},
      features={"seq": js.Features(["u", "v", "w"])},
      singles=("rnn/cell/dense_i/kernel/value",), source="nnx",
      notes="nnx.RNN(nnx.GRUCell, rngs=False) over time (lax.scan) with an explicit "
            "zero initial carry, linear head on the last output.")


# ----------------------------------------------------------------------------
# OpenAI-Five-style set encoder


def five(rng: _Rng) -> ZooModel:
  U, FU, FG, NT, H, L, A = 6, 5, 3, 4, 8, 8, 4
  params = {
      "obs_norm": {"mean": rng.normal((FU,)), "std": rng.positive((FU,))},
      "globals_norm": {"mean": rng.normal((FG,)), "std": rng.positive((FG,))},
      "unit_mlp": [rng.dense(FU, H), rng.dense(H, H)],
      "unit_embed": rng.normal((NT, H)),
      "torso": rng.dense(H + FG, L),
      "lstm": {"wi": rng.normal((L, 4 * L)), "wh": rng.normal((L, 4 * L)),
               "b": rng.normal((4 * L,))},
      "move_head": rng.dense(L, A),
      "target_query": rng.dense(L, H),
  }

  def fn(params, inputs):
    units = (inputs["units"] - params["obs_norm"]["mean"]) / params["obs_norm"]["std"]
    glob = (inputs["globals"] - params["globals_norm"]["mean"]) / params["globals_norm"]["std"]
    h = jax.nn.relu(_dense(params["unit_mlp"][0], units))           # (B, U, H)
    h = _dense(params["unit_mlp"][1], h)
    h = h + params["unit_embed"][inputs["unit_type"]]                # (B, U, H)
    pooled = h.max(axis=1)                                            # (B, H)
    x = jax.nn.relu(_dense(params["torso"], jnp.concatenate([pooled, glob], -1)))
    c, hid = inputs["state"]["c"], inputs["state"]["h"]
    gates = x @ params["lstm"]["wi"] + hid @ params["lstm"]["wh"] + params["lstm"]["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    hid = jax.nn.sigmoid(o) * jnp.tanh(c)
    move = _dense(params["move_head"], hid)                           # (B, A)
    query = _dense(params["target_query"], hid)                       # (B, H)
    target = jnp.einsum("buh,bh->bu", h, query)                       # (B, U)
    return {"move": move, "target": target}

  inputs = {
      "units": rng.normal((BATCH, U, FU), 1.0),
      "unit_type": rng.ints((BATCH, U), NT),
      "globals": rng.normal((BATCH, FG), 1.0),
      "state": {"c": rng.normal((BATCH, L), 1.0), "h": rng.normal((BATCH, L), 1.0)},
  }
  features = {
      "units": js.Features(["unit_hp", "unit_mana", "unit_x", "unit_y", "unit_dist"]),
      "unit_type": "unit_type",
      "globals": js.Features(["time", "gold", "team_score"]),
      "state": None,
  }
  return ZooModel(
      name="five", fn=fn, params=params, inputs=inputs, features=features,
      singles=("globals_norm/mean", "globals_norm/std", "obs_norm/mean", "obs_norm/std",
               "unit_embed", "unit_mlp/0/kernel"),
      source="plain",
      notes="Per-feature normalisation, per-unit MLP, unit-type embedding, max-pool "
            "over units, concat globals, one LSTM step (recurrent state input has "
            "spec None), move head and pointer-style target head over units.")


# ----------------------------------------------------------------------------
# Residual, tying, weight norm


def residual(rng: _Rng) -> ZooModel:
  F, H, O, NB = 4, 6, 2, 2
  params = {
      "in_proj": rng.dense(F, H),
      "blocks": [{"w1": rng.dense(H, H), "w2": rng.dense(H, H)} for _ in range(NB)],
      "out": rng.dense(H, O),
  }

  def fn(params, inputs):
    x = _dense(params["in_proj"], inputs)
    for block in params["blocks"]:
      x = x + _dense(block["w2"], jax.nn.relu(_dense(block["w1"], x)))
    return _dense(params["out"], x)

  return ZooModel(
      name="residual", fn=fn, params=params,
      inputs=rng.normal((BATCH, F), 1.0),
      features=js.Features(["p", "q", "r", "s"]),
      singles=("in_proj/kernel",), source="plain",
      notes="Input projection and 2 residual blocks x + W2 relu(W1 x).")


def tied(rng: _Rng) -> ZooModel:
  V, D, F, T = 7, 4, 3, 5
  params = {
      "embed": rng.normal((V, D)),
      "proj_t": rng.normal((D, F + 2)),   # read as proj_t[:, :F].T; last 2 columns unused
      "mix": rng.normal((D * D,)),        # read as mix.reshape(D, D)
      "head": rng.normal((D, 2 * D)),     # read as head[:, :D]; other half unused
  }

  def fn(params, inputs):
    tok = params["embed"][inputs["tokens"]].mean(axis=1)           # (B, D)
    x = inputs["obs"] @ params["proj_t"][:, :F].T                   # (B, D)
    h = jnp.tanh(x + tok) @ params["mix"].reshape(D, D)
    h = jnp.tanh(h @ params["head"][:, :D])
    return {"logits": h @ params["embed"].T}                        # (B, V)

  inputs = {"tokens": rng.ints((BATCH, T), V), "obs": rng.normal((BATCH, F), 1.0)}
  return ZooModel(
      name="tied", fn=fn, params=params, inputs=inputs,
      features={"tokens": "tokens", "obs": js.Features(["o0", "o1", "o2"])},
      singles=("proj_t",), source="plain",
      notes="Embedding tied between the input gather and the output logits (not a "
            "single: it meets every feature at the output); transposed, reshaped and "
            "sliced parameter views. proj_t[:, F:] and head[:, D:] are never read.")


def weightnorm(rng: _Rng) -> ZooModel:
  F, H, O = 4, 5, 3
  params = {
      "wn": {"v": rng.normal((F, H)), "g": rng.normal((H,)), "bias": rng.normal((H,))},
      "out": rng.dense(H, O),
      "log_scale": rng.normal((O,)),
  }

  def fn(params, inputs):
    wn = params["wn"]
    kernel = wn["g"] * wn["v"] / jnp.linalg.norm(wn["v"], axis=0, keepdims=True)
    h = jax.nn.relu(inputs @ kernel + wn["bias"])
    return _dense(params["out"], h) * jnp.exp(params["log_scale"])

  return ZooModel(
      name="weightnorm", fn=fn, params=params,
      inputs=rng.normal((BATCH, F), 1.0),
      features=js.Features(["w", "x", "y", "z"]),
      singles=(), source="plain",
      notes="Weight-normalised first layer, kernel = g * v / ||v|| with the norm over "
            "inputs (every v element reaches every input row: no singles); output "
            "scaled by exp(log_scale).")


# ----------------------------------------------------------------------------
# Registry

_BUILDERS: dict[str, Callable[[_Rng], ZooModel]] = {
    b.__name__: b for b in (
        mlp_relu, mlp_tanh, mlp_gelu, mlp_nnx, mlp_linen, convnet, embedding,
        layernorm, batchnorm, attention, lstm, gru, five, residual, tied, weightnorm)
}


def names() -> tuple[str, ...]:
  """The names of all zoo models."""
  return tuple(_BUILDERS)


def get(name: str, seed: int = 0) -> ZooModel:
  """Builds one zoo model; deterministic in (name, seed)."""
  if name not in _BUILDERS:
    raise KeyError(f"No zoo model {name!r}; available: {', '.join(_BUILDERS)}.")
  return _BUILDERS[name](_Rng(seed, name))


def zoo(seed: int = 0) -> dict[str, ZooModel]:
  """Builds all zoo models."""
  return {name: get(name, seed) for name in _BUILDERS}


def abstract(model: ZooModel) -> tuple[Any, Any]:
  """(params, inputs) of ``model`` as jax.ShapeDtypeStruct trees."""
  to_sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(to_sds, model.params), jax.tree.map(to_sds, model.inputs)
