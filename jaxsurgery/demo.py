"""End-to-end demo: a set encoder + LSTM policy gains an observation and a wider LSTM mid-run.

Run with ``python -m jaxsurgery.demo``. Everything is planned from abstract
shapes; only the final transfer and the check touch real arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxsurgery as js


class Policy(nnx.Module):
  """A set encoder (max-pooled unit MLP) plus a hero embedding, an LSTM over time and a head."""

  def __init__(self, n_unit_features: int, hidden: int, *, rngs: nnx.Rngs):
    self.unit_mlp = nnx.Linear(n_unit_features, 16, rngs=rngs)
    self.hero_embed = nnx.Embed(10, 16, rngs=rngs)
    self.lstm = nnx.OptimizedLSTMCell(16, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 4, rngs=rngs)
    self.hidden = hidden

  def __call__(self, obs):
    """Logits of the last step, from ``obs["units"]`` (B, T, U, F) and ``obs["hero"]`` (B, T)."""
    units = jax.nn.relu(self.unit_mlp(obs["units"]))          # (B, T, U, 16)
    x = units.max(axis=2) + self.hero_embed(obs["hero"])      # (B, T, 16)
    b = x.shape[0]
    carry = (jnp.zeros((b, self.hidden)), jnp.zeros((b, self.hidden)))
    _, hs = jax.lax.scan(lambda c, xt: self.lstm(c, xt), carry, jnp.swapaxes(x, 0, 1))
    return self.head(hs[-1])


def model(n_features: int, hidden: int, seed: int):
  """``(fn, abstract params, make)``: the pure function, its abstract params and a concrete init."""
  abstract = nnx.eval_shape(lambda: Policy(n_features, hidden, rngs=nnx.Rngs(seed)))
  graph, abstract_params = nnx.split(abstract, nnx.Param)
  fn = lambda p, obs: nnx.merge(graph, p)(obs)
  make = lambda: nnx.split(Policy(n_features, hidden, rngs=nnx.Rngs(seed)), nnx.Param)[1]
  return fn, abstract_params, make


def main():
  """Plans, applies and verifies the surgery, printing the table, the report and the check."""
  old_names = ["hp", "mana", "x", "y"]
  new_names = ["hp", "armor", "mana", "x", "y"]        # a new observation, inserted
  obs = lambda n: {"units": jax.ShapeDtypeStruct((2, 3, 6, n), jnp.float32),
                   "hero": jax.ShapeDtypeStruct((2, 3), jnp.int32)}
  old_fn, old_abstract, old_make = model(4, 8, seed=0)
  new_fn, new_abstract, new_make = model(5, 12, seed=1)   # ... and a wider LSTM

  old_table = js.dependency_table(old_fn, old_abstract, obs(4), {"units": js.Features(old_names), "hero": "hero"})
  new_table = js.dependency_table(new_fn, new_abstract, obs(5), {"units": js.Features(new_names), "hero": "hero"})
  print(new_table, "\n")
  surgery = js.plan(old_table, new_table)
  print(surgery.report, "\n")

  trained = old_make()   # stands in for the trained checkpoint
  new_params = surgery(trained, new_make())
  # The old LSTM units of the new model must compute what the old model did.
  head_cut = lambda p, o: new_fn(p, o)
  check = js.verify(surgery, old_fn, head_cut, trained, new_params, obs(4), obs(5),
                    key=jax.random.key(0), atol=1e-5)
  print(check)


if __name__ == "__main__":
  main()
