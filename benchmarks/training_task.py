"""The task and model of `bench_training.py`: a sequence classifier whose new input feature matters.

Task. Each sequence has T steps with three observations per step, a_t, b_t, c_t ~ N(0, 1). A
hidden state s_t = DECAY * s_{t-1} + sin(3 a_t) b_t + C_WEIGHT c_t is summed over time, and the
label at every step is the quartile of s_t (4 classes, cross-entropy averaged over steps). Both
terms have about the same variance. The old model sees [a, b] only, so c acts as noise to it and
its loss has a floor well above zero; the new model also sees c (inserted between a and b) and
can learn the whole state. The old term is the harder one to learn (an oscillating function of
a times b, summed in memory); c's term is linear, so what the old model learned is most of what
the new one needs.

Model. `fn(params, xs)`: a ReLU encoder per step, a fused-gate LSTM over `lax.scan`, and a ReLU MLP
head at every step. Parameters are plain dicts of arrays (no framework), so that the naive
"copy what fits by shape" transfer is easy to write and to audit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

OLD_FEATURES = ("a", "b")
NEW_FEATURES = ("a", "c", "b")   # the new observation is inserted, not appended
CLASSES = 4
DECAY = 0.8
C_WEIGHT = 0.7
# Quartiles of a normal law with s_t's stationary variance: E[sin(3a)^2 b^2] = (1 - e^-18) / 2.
_STD = ((0.5 + C_WEIGHT**2) / (1 - DECAY**2)) ** 0.5
BIN_EDGES = (-0.6745 * _STD, 0.0, 0.6745 * _STD)


@dataclasses.dataclass(frozen=True)
class Shape:
  features: int      # input features per step
  encoder: int = 32
  hidden: int = 32   # LSTM units
  head: int = 32     # head MLP width


def init_params(key, shape: Shape):
  """Lecun-normal kernels, zero biases (LSTM forget-gate bias 1), as a framework would."""
  k = jax.random.split(key, 5)
  f, e, h, m = shape.features, shape.encoder, shape.hidden, shape.head
  dense = lambda key, n_in, n_out: jax.random.normal(key, (n_in, n_out)) / jnp.sqrt(n_in)
  gate_bias = jnp.zeros((4, h)).at[1].set(1.0).reshape(4 * h)   # gates i, f, g, o
  return {
      "enc": {"w": dense(k[0], f, e), "b": jnp.zeros((e,))},
      "lstm": {"wi": dense(k[1], e, 4 * h), "wh": dense(k[2], h, 4 * h), "b": gate_bias},
      "head": {"w1": dense(k[3], h, m), "b1": jnp.zeros((m,)),
               "w2": dense(k[4], m, CLASSES), "b2": jnp.zeros((CLASSES,))},
  }


def fn(params, xs):
  """Logits (B, T, CLASSES) for observations xs (B, T, features)."""
  enc = jax.nn.relu(xs @ params["enc"]["w"] + params["enc"]["b"])
  lstm = params["lstm"]
  hidden = lstm["wh"].shape[0]

  def cell(carry, x):
    h, c = carry
    gates = x @ lstm["wi"] + h @ lstm["wh"] + lstm["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  batch = xs.shape[0]
  zeros = jnp.zeros((batch, hidden), xs.dtype)
  _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(enc, 0, 1))
  hs = jnp.swapaxes(hs, 0, 1)                                  # (B, T, H)
  head = params["head"]
  return jax.nn.relu(hs @ head["w1"] + head["b1"]) @ head["w2"] + head["b2"]


def batch(key, size: int, steps: int):
  """{"a", "b", "c"}: (size, steps) each, and labels (size, steps) int32."""
  ka, kb, kc = jax.random.split(key, 3)
  obs = {n: jax.random.normal(k, (size, steps)) for n, k in zip("abc", (ka, kb, kc))}
  drive = jnp.sin(3 * obs["a"]) * obs["b"] + C_WEIGHT * obs["c"]

  def step(s, d):
    s = DECAY * s + d
    return s, s

  _, s = jax.lax.scan(step, jnp.zeros((size,)), drive.T)
  labels = jnp.searchsorted(jnp.asarray(BIN_EDGES), s.T).astype(jnp.int32)
  return obs, labels


def view(obs, names):
  """The model's input (B, T, len(names)): the named observations stacked in that order."""
  return jnp.stack([obs[n] for n in names], axis=-1)


def loss(params, xs, labels):
  logits = fn(params, xs)
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()
