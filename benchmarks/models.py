"""Benchmark models: plain jax functions ``fn(params, inputs)`` with abstract (ShapeDtypeStruct) trees.

Every builder returns a :class:`Model` (fn, params, inputs, features); nothing is
allocated until :func:`concrete` is called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxsurgery as js

f32 = jnp.float32
sds = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  fn: Callable
  params: Any
  inputs: Any
  features: Any

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))


def dense(n_in, n_out):
  return {"kernel": sds((n_in, n_out), f32), "bias": sds((n_out,), f32)}


def apply_dense(p, x):
  return x @ p["kernel"] + p["bias"]


def names(prefix, n):
  return [f"{prefix}{i}" for i in range(n)]


def concrete(tree, seed=0, scale=0.02):
  """Random float32 arrays (ints in [0, 4)) with the shapes of an abstract tree."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.randint(k, x.shape, 0, 4, x.dtype) if jnp.issubdtype(x.dtype, jnp.integer)
         else scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# OpenAI-Five scale


@dataclasses.dataclass(frozen=True)
class FiveConfig:
  units: int = 189           # unit slots
  unit_features: int = 43    # continuous features per unit
  unit_types: int = 512      # categorical: unit type embedding
  items: int = 6             # categorical: item slots per unit, one shared item embedding
  item_types: int = 256
  globals: int = 24          # global continuous features
  hidden: int = 128          # per-unit / global encoder width
  lstm: int = 4096           # LSTM width
  steps: int = 16            # time steps (lax.scan)
  batch: int = 1
  action_types: int = 32
  move: int = 81             # 9x9 offset grid


def five(cfg: FiveConfig = FiveConfig()) -> Model:
  """OpenAI-Five-style policy: unit set encoder + embeddings, globals, torso, LSTM scan, heads.

  ~152M parameters at the default config (the LSTM is 134M of them).
  """
  H, L = cfg.hidden, cfg.lstm
  params = {
      "unit_norm": {"mean": sds((cfg.unit_features,), f32), "std": sds((cfg.unit_features,), f32)},
      "glob_norm": {"mean": sds((cfg.globals,), f32), "std": sds((cfg.globals,), f32)},
      "unit_type_embed": sds((cfg.unit_types, H), f32),
      "item_embed": sds((cfg.item_types, H), f32),
      "unit_mlp": [dense(cfg.unit_features, H), dense(H, H)],
      "glob_mlp": dense(cfg.globals, H),
      "torso": [dense(2 * H + H, L), dense(L, L)],
      # Fused LSTM kernels (gates i, f, g, o side by side), like flax OptimizedLSTMCell.
      "lstm": {"wi": sds((L, 4 * L), f32), "wh": sds((L, 4 * L), f32), "b": sds((4 * L,), f32)},
      "heads": {"action_type": dense(L, cfg.action_types), "move": dense(L, cfg.move),
                "target_query": dense(L, H), "value": dense(L, 1)},
  }

  def fn(params, inputs):
    units = (inputs["units"] - params["unit_norm"]["mean"]) / params["unit_norm"]["std"]
    h = jax.nn.relu(apply_dense(params["unit_mlp"][0], units))               # (B, T, U, H)
    h = apply_dense(params["unit_mlp"][1], h)
    h = h + params["unit_type_embed"][inputs["unit_type"]]
    h = h + params["item_embed"][inputs["items"]].sum(axis=-2)
    pooled = jnp.concatenate([h.max(axis=2), h.mean(axis=2)], -1)             # (B, T, 2H)
    glob = (inputs["globals"] - params["glob_norm"]["mean"]) / params["glob_norm"]["std"]
    glob = jax.nn.relu(apply_dense(params["glob_mlp"], glob))                 # (B, T, H)
    x = jax.nn.relu(apply_dense(params["torso"][0], jnp.concatenate([pooled, glob], -1)))
    x = jax.nn.relu(apply_dense(params["torso"][1], x))                       # (B, T, L)

    lstm = params["lstm"]

    def cell(carry, x_t):
      c, hid = carry
      gates = x_t @ lstm["wi"] + hid @ lstm["wh"] + lstm["b"]
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      hid = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (c, hid), hid

    state = (inputs["state"]["c"], inputs["state"]["h"])
    _, hs = jax.lax.scan(cell, state, jnp.swapaxes(x, 0, 1))
    hs = jnp.swapaxes(hs, 0, 1)                                               # (B, T, L)
    heads = params["heads"]
    query = apply_dense(heads["target_query"], hs)                            # (B, T, H)
    return {"action_type": apply_dense(heads["action_type"], hs),
            "move": apply_dense(heads["move"], hs),
            "target": jnp.einsum("btuh,bth->btu", h, query),
            "value": apply_dense(heads["value"], hs)}

  B, T, U = cfg.batch, cfg.steps, cfg.units
  inputs = {
      "units": sds((B, T, U, cfg.unit_features), f32),
      "unit_type": sds((B, T, U), jnp.int32),
      "items": sds((B, T, U, cfg.items), jnp.int32),
      "globals": sds((B, T, cfg.globals), f32),
      "state": {"c": sds((B, L), f32), "h": sds((B, L), f32)},
  }
  features = {
      "units": js.Features(names("unit_f", cfg.unit_features)),
      "unit_type": "unit_type",
      "items": "items",
      "globals": js.Features(names("global_f", cfg.globals)),
      "state": None,
  }
  return Model(f"five_L{L}_T{T}", fn, params, inputs, features)


# ----------------------------------------------------------------------------
# Small models with a flat input vector and one feature per element (asdex comparison)


def per_element(name, fn, params, n_in) -> Model:
  return Model(name, fn, params, sds((n_in,), f32), js.Features(names("x", n_in)))


def set_encoder(units=189, feats=43, hidden=128) -> Model:
  """OpenAI-Five unit encoder: flat (units*feats,) -> per-unit 2-layer MLP -> max-pool -> (hidden,)."""
  params = [dense(feats, hidden), dense(hidden, hidden)]

  def fn(params, x):
    h = jax.nn.relu(apply_dense(params[0], x.reshape(units, feats)))
    return apply_dense(params[1], h).max(axis=0)
  return per_element(f"set_encoder_{units}x{feats}", fn, params, units * feats)


def mlp(n_in=256, hidden=256, n_out=32) -> Model:
  params = [dense(n_in, hidden), dense(hidden, hidden), dense(hidden, n_out)]

  def fn(params, x):
    x = jnp.tanh(apply_dense(params[0], x))
    x = jax.nn.relu(apply_dense(params[1], x))
    return apply_dense(params[2], x)
  return per_element(f"mlp_{n_in}_{hidden}_{n_out}", fn, params, n_in)


def convnet(size=16, channels=3, width=8) -> Model:
  """Two 3x3 SAME convs (NHWC) on a flattened image: a sparse, local Jacobian pattern."""
  params = {"c1": sds((3, 3, channels, width), f32), "b1": sds((width,), f32),
            "c2": sds((3, 3, width, width), f32), "b2": sds((width,), f32)}
  dn = ("NHWC", "HWIO", "NHWC")

  def fn(params, x):
    x = x.reshape(1, size, size, channels)
    x = jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
    x = jax.nn.relu(x + params["b1"])
    x = jax.lax.conv_general_dilated(x, params["c2"], (2, 2), "SAME", dimension_numbers=dn)
    return jnp.tanh(x + params["b2"]).reshape(-1)
  return per_element(f"conv_{size}x{size}x{channels}", fn, params, size * size * channels)


def local_mlp(n=1024) -> Model:
  """Elementwise + neighbour differences + a shared small MLP per position: banded pattern."""
  params = {"w1": sds((3, 16), f32), "w2": sds((16,), f32)}

  def fn(params, x):
    left, right = jnp.roll(x, 1), jnp.roll(x, -1)
    h = jnp.tanh(jnp.stack([left, x, right], -1) @ params["w1"])
    return h @ params["w2"] + jnp.sin(x) * x
  return per_element(f"banded_{n}", fn, params, n)


# ----------------------------------------------------------------------------
# Scaling: a fixed 16k-wide MLP whose input holds `num_features` named features


def wide_mlp(num_features: int, width=16384, hidden=256, batch=4) -> Model:
  """Input (batch, width // F, F) with F named features, flattened to (batch, width) in fn."""
  assert width % num_features == 0
  params = [dense(width, hidden), dense(hidden, hidden), dense(hidden, 16)]

  def fn(params, x):
    x = x.reshape(x.shape[0], width)
    x = jax.nn.relu(apply_dense(params[0], x))
    x = jax.nn.relu(apply_dense(params[1], x))
    return apply_dense(params[2], x)
  x = sds((batch, width // num_features, num_features), f32)
  return Model(f"wide_mlp_F{num_features}", fn, params, x, js.Features(names("f", num_features)))
