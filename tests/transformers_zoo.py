"""Small transformer models for the widening tests: plain JAX, Flax NNX, and Llama-style.

Each builder takes a :class:`Cfg` and returns ``(fn, init(key) -> params, tokens ShapeDtypeStruct)``;
``fn(params, tokens) -> logits`` over the vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Cfg:
  vocab: int = 11
  d: int = 8
  heads: int = 2
  head_dim: int = 4
  mlp: int = 16
  layers: int = 2
  seq: int = 5
  eps: float = 1e-5
  fast_var: bool = False   # LayerNorm variance as E[x^2] - E[x]^2 (Flax's default)
  rope: bool = False


def _rand(key, shape, scale=0.3):
  return jax.random.normal(key, shape) * scale


def layer_norm(x, g, b, eps, fast):
  mu = x.mean(-1, keepdims=True)
  if fast:
    var = jnp.maximum(0.0, (x * x).mean(-1, keepdims=True) - jnp.square(mu))
  else:
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def rms_norm(x, g, eps):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope(x):
  """Rotary position embedding over the last axis (pairs of halves)."""
  t, d = x.shape[-3], x.shape[-1]
  freqs = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
  ang = np.arange(t)[:, None] * freqs[None, :]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]  # traced, like most implementations
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def attention(q, k, v, head_dim, causal=True):
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
  if causal:
    t = q.shape[1]
    mask = np.tril(np.ones((t, t), bool))
    s = jnp.where(mask, s, -1e9)
  a = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhts,bshd->bthd", a, v)


# -- a pre-LN GPT in plain JAX: learned positions, LayerNorm, tied embedding --------------

def gpt(cfg: Cfg):
  def fn(p, ids):
    b, t = ids.shape
    h = p["emb"][ids] + p["pos"][:t]
    for l in range(cfg.layers):
      blk = p[f"h{l}"]
      z = layer_norm(h, blk["ln1"]["g"], blk["ln1"]["b"], cfg.eps, cfg.fast_var)
      q = (z @ blk["q"]).reshape(b, t, cfg.heads, cfg.head_dim)
      k = (z @ blk["k"] + blk["bk"]).reshape(b, t, cfg.heads, cfg.head_dim)
      v = (z @ blk["v"]).reshape(b, t, cfg.heads, cfg.head_dim)
      o = attention(q, k, v, cfg.head_dim).reshape(b, t, cfg.heads * cfg.head_dim)
      h = h + o @ blk["o"] + blk["bo"]
      z = layer_norm(h, blk["ln2"]["g"], blk["ln2"]["b"], cfg.eps, cfg.fast_var)
      h = h + jax.nn.gelu(z @ blk["w1"] + blk["b1"]) @ blk["w2"] + blk["b2"]
    return layer_norm(h, p["lnf"]["g"], p["lnf"]["b"], cfg.eps, cfg.fast_var) @ p["emb"].T

  def init(key):
    ks = iter(jax.random.split(key, 4 + 16 * cfg.layers))
    hd = cfg.heads * cfg.head_dim
    p = {"emb": _rand(next(ks), (cfg.vocab, cfg.d)), "pos": _rand(next(ks), (16, cfg.d)),
         "lnf": {"g": 1 + _rand(next(ks), (cfg.d,)), "b": _rand(next(ks), (cfg.d,))}}
    for l in range(cfg.layers):
      p[f"h{l}"] = {
          "ln1": {"g": 1 + _rand(next(ks), (cfg.d,)), "b": _rand(next(ks), (cfg.d,))},
          "q": _rand(next(ks), (cfg.d, hd)), "k": _rand(next(ks), (cfg.d, hd)), "bk": _rand(next(ks), (hd,)),
          "v": _rand(next(ks), (cfg.d, hd)), "o": _rand(next(ks), (hd, cfg.d)), "bo": _rand(next(ks), (cfg.d,)),
          "ln2": {"g": 1 + _rand(next(ks), (cfg.d,)), "b": _rand(next(ks), (cfg.d,))},
          "w1": _rand(next(ks), (cfg.d, cfg.mlp)), "b1": _rand(next(ks), (cfg.mlp,)),
          "w2": _rand(next(ks), (cfg.mlp, cfg.d)), "b2": _rand(next(ks), (cfg.d,))}
    return p
  return fn, init, jax.ShapeDtypeStruct((2, cfg.seq), jnp.int32)


# -- a Llama-style block stack: RMSNorm, SwiGLU, optional RoPE, untied head ---------------

def llama(cfg: Cfg):
  def fn(p, ids):
    b, t = ids.shape
    h = p["emb"][ids]
    for l in range(cfg.layers):
      blk = p[f"h{l}"]
      z = rms_norm(h, blk["n1"], cfg.eps)
      q = (z @ blk["q"]).reshape(b, t, cfg.heads, cfg.head_dim)
      k = (z @ blk["k"]).reshape(b, t, cfg.heads, cfg.head_dim)
      v = (z @ blk["v"]).reshape(b, t, cfg.heads, cfg.head_dim)
      if cfg.rope:
        q, k = rope(q), rope(k)
      h = h + attention(q, k, v, cfg.head_dim).reshape(b, t, -1) @ blk["o"]
      z = rms_norm(h, blk["n2"], cfg.eps)
      h = h + (jax.nn.silu(z @ blk["gate"]) * (z @ blk["up"])) @ blk["down"]
    return rms_norm(h, p["nf"], cfg.eps) @ p["head"]

  def init(key):
    ks = iter(jax.random.split(key, 3 + 9 * cfg.layers))
    hd = cfg.heads * cfg.head_dim
    p = {"emb": _rand(next(ks), (cfg.vocab, cfg.d)), "nf": 1 + _rand(next(ks), (cfg.d,)),
         "head": _rand(next(ks), (cfg.d, cfg.vocab))}
    for l in range(cfg.layers):
      p[f"h{l}"] = {"n1": 1 + _rand(next(ks), (cfg.d,)), "q": _rand(next(ks), (cfg.d, hd)),
                    "k": _rand(next(ks), (cfg.d, hd)), "v": _rand(next(ks), (cfg.d, hd)),
                    "o": _rand(next(ks), (hd, cfg.d)), "n2": 1 + _rand(next(ks), (cfg.d,)),
                    "gate": _rand(next(ks), (cfg.d, cfg.mlp)), "up": _rand(next(ks), (cfg.d, cfg.mlp)),
                    "down": _rand(next(ks), (cfg.mlp, cfg.d))}
    return p
  return fn, init, jax.ShapeDtypeStruct((2, cfg.seq), jnp.int32)


# -- a Flax NNX transformer block: nnx.MultiHeadAttention, nnx.LayerNorm, MLP -------------

class NNXBlock(nnx.Module):
  def __init__(self, cfg: Cfg, rngs: nnx.Rngs):
    self.emb = nnx.Embed(cfg.vocab, cfg.d, rngs=rngs)
    self.ln1 = nnx.LayerNorm(cfg.d, epsilon=cfg.eps, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=cfg.heads, in_features=cfg.d,
                                       qkv_features=cfg.heads * cfg.head_dim, out_features=cfg.d,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.d, epsilon=cfg.eps, rngs=rngs)
    self.up = nnx.Linear(cfg.d, cfg.mlp, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp, cfg.d, rngs=rngs)
    self.head = nnx.Linear(cfg.d, cfg.vocab, rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)
    h = h + self.attn(self.ln1(h))
    h = h + self.down(jax.nn.gelu(self.up(self.ln2(h))))
    return self.head(h)


def nnx_block(cfg: Cfg):
  model = NNXBlock(cfg, nnx.Rngs(0))
  graph, _ = nnx.split(model, nnx.Param)

  def fn(p, ids):
    return nnx.merge(graph, p)(ids)

  def init(key):
    m = NNXBlock(cfg, nnx.Rngs(int(jax.random.randint(key, (), 0, 1 << 30))))
    params = nnx.state(m, nnx.Param)
    # random (not zero) biases and norm offsets, so that nothing hides
    return jax.tree.map(lambda x: x + _rand(jax.random.fold_in(key, x.size), x.shape, 0.1), params)
  return fn, init, jax.ShapeDtypeStruct((2, cfg.seq), jnp.int32)
