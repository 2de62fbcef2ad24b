"""Random surgery cases: a small model description, an edit, and the transfer they imply.

A :class:`ModelSpec` describes a plain-JAX model ``fn(params, inputs)`` built from dense
layers, norms, residual blocks, attention, learned positions, RNN cells over ``lax.scan``,
convolutions, embeddings and concatenated inputs. :func:`build` turns it into a
:class:`Model`: the function, ``init(seed)``, the inputs as ``ShapeDtypeStruct`` and the
feature spec. Edits (:class:`InsertFeature`, :class:`Widen`, :class:`InsertBlock`, ...)
turn one description into another, so the old and the new model come from one source.

Every parameter element carries a *label*: the input feature, unit, gate, head, kernel
tap or row it belongs to. Labels are what the edit preserves, so the transfer a correct
surgery must make is label equality: a new element takes the old element with the same
label (in the leaf of the same layer), and is fresh when there is none. Widened layers
keep their old units first (the library's convention for unnamed units), features move
by name. :func:`check_pair` plans the surgery through the public API and compares it
with that transfer; it returns the failures it finds instead of raising, so that the
test suite and ``scripts/fuzz.py`` share it.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import jaxsurgery as js

BATCH = 2
IMAGE = 6  # spatial size of image inputs
ATOL = 1e-5


class InvalidSpec(ValueError):
  """A description or an edit that does not make a model (the generator's fault, not the library's)."""


# -- layers -----------------------------------------------------------------------

@dataclass(frozen=True)
class Dense:
  """``tanh(h @ w + b)`` over the feature axis."""
  uid: str
  width: int


@dataclass(frozen=True)
class Norm:
  """LayerNorm (gain and bias) or RMSNorm (gain) over the feature axis."""
  uid: str
  kind: str = "ln"


@dataclass(frozen=True)
class Residual:
  """``h + tanh(norm(h) @ w1 + b1) @ w2 + b2``; the optional norm is a pre-LN."""
  uid: str
  width: int
  pre_norm: bool = False


@dataclass(frozen=True)
class Attention:
  """Residual multi-head self-attention (sequence models)."""
  uid: str
  heads: int
  head_dim: int
  causal: bool = False


@dataclass(frozen=True)
class Positions:
  """A learned positional table with ``rows >= length``, gathered with ``arange(length)``."""
  uid: str
  rows: int


@dataclass(frozen=True)
class RNN:
  """An RNN cell over ``lax.scan``: ``elman``, ``gru`` (even 3-way split of a fused kernel),
  ``gru_uneven`` (Haiku's layout: ``[2H | H]``, then halves) or ``lstm`` (4 gates)."""
  uid: str
  hidden: int
  cell: str = "gru"


@dataclass(frozen=True)
class Conv:
  """``relu(conv(h) + b)``, SAME padding; ``groups=0`` is depthwise (one group per input channel)."""
  uid: str
  channels: int
  kernel: int = 3
  stride: int = 1
  dilation: int = 1
  groups: int = 1


@dataclass(frozen=True)
class ModelSpec:
  """A small model. ``kind``: ``vec`` (B, F), ``seq`` (B, T, F) or ``img`` (B, S, S, C) / (B, C, S, S).

  The stream is ``concat([x, y, embed[ids]], -1)`` (``y`` when ``extra``, ``ids`` when
  ``vocab``), then ``layers``, then a dense ``head`` of width ``out``. Sequence models
  read the last step; image models pool (``mean`` or ``flatten``) after their convolutions.
  ``naming="index"`` names the layers ``layer_0, layer_1, ...`` as Flax does, so that an
  inserted block shifts the names after it.
  """
  kind: str = "vec"
  features: tuple[str, ...] = ("f0", "f1", "f2")
  extra: tuple[str, ...] = ()
  vocab: int = 0
  embed: int = 2
  layers: tuple[Any, ...] = ()
  out: int = 2
  naming: str = "uid"
  length: int = 3
  layout: str = "NHWC"
  pool: str = "mean"


# -- edits --------------------------------------------------------------------------

@dataclass(frozen=True)
class InsertFeature:
  leaf: str  # "x" or "y"
  at: int
  name: str


@dataclass(frozen=True)
class RemoveFeature:
  leaf: str
  at: int


@dataclass(frozen=True)
class PermuteFeatures:
  leaf: str
  order: tuple[int, ...]


@dataclass(frozen=True)
class MoveFeature:
  """Moves feature ``x[at]`` to position ``to`` of ``y``."""
  at: int
  to: int


@dataclass(frozen=True)
class Widen:
  """More units: Dense/Residual width, RNN hidden, Attention heads, Conv channels (per group)."""
  uid: str
  by: int


@dataclass(frozen=True)
class WidenHeadDim:
  uid: str
  by: int


@dataclass(frozen=True)
class InsertBlock:
  at: int
  layer: Any


@dataclass(frozen=True)
class GrowVocab:
  by: int


@dataclass(frozen=True)
class GrowOutput:
  by: int


def _features_edit(spec: ModelSpec, leaf: str, names: tuple[str, ...]) -> ModelSpec:
  if leaf == "x":
    return dataclasses.replace(spec, features=names)
  return dataclasses.replace(spec, extra=names)


def _names(spec: ModelSpec, leaf: str) -> tuple[str, ...]:
  if leaf not in ("x", "y") or (leaf == "y" and (spec.kind == "img" or not spec.extra)):
    raise InvalidSpec(f"no feature leaf {leaf!r}")
  return spec.features if leaf == "x" else spec.extra


def _widen_layer(layer, by: int, head_dim: bool):
  if head_dim:
    if not isinstance(layer, Attention):
      raise InvalidSpec("head_dim of a non-attention layer")
    return dataclasses.replace(layer, head_dim=layer.head_dim + by)
  if isinstance(layer, (Dense, Residual)):
    return dataclasses.replace(layer, width=layer.width + by)
  if isinstance(layer, RNN):
    return dataclasses.replace(layer, hidden=layer.hidden + by)
  if isinstance(layer, Attention):
    return dataclasses.replace(layer, heads=layer.heads + by)
  if isinstance(layer, Conv):
    return dataclasses.replace(layer, channels=layer.channels + by * max(layer.groups, 1))
  raise InvalidSpec(f"cannot widen {type(layer).__name__}")


def apply_edit(spec: ModelSpec, edit) -> ModelSpec:
  """The description after one edit; :class:`InvalidSpec` if the edit does not apply."""
  if isinstance(edit, InsertFeature):
    names = _names(spec, edit.leaf)
    if edit.name in spec.features + spec.extra or not 0 <= edit.at <= len(names):
      raise InvalidSpec("bad insertion")
    return _features_edit(spec, edit.leaf, names[:edit.at] + (edit.name,) + names[edit.at:])
  if isinstance(edit, RemoveFeature):
    names = _names(spec, edit.leaf)
    if len(names) < 2 or not 0 <= edit.at < len(names):
      raise InvalidSpec("bad removal")
    return _features_edit(spec, edit.leaf, names[:edit.at] + names[edit.at + 1:])
  if isinstance(edit, PermuteFeatures):
    names = _names(spec, edit.leaf)
    if sorted(edit.order) != list(range(len(names))):
      raise InvalidSpec("bad permutation")
    return _features_edit(spec, edit.leaf, tuple(names[i] for i in edit.order))
  if isinstance(edit, MoveFeature):
    xs, ys = _names(spec, "x"), _names(spec, "y")
    if len(xs) < 2 or not 0 <= edit.at < len(xs) or not 0 <= edit.to <= len(ys):
      raise InvalidSpec("bad move")
    moved = xs[edit.at]
    return dataclasses.replace(spec, features=xs[:edit.at] + xs[edit.at + 1:],
                               extra=ys[:edit.to] + (moved,) + ys[edit.to:])
  if isinstance(edit, (Widen, WidenHeadDim)):
    layers = list(spec.layers)
    hits = [i for i, l in enumerate(layers) if l.uid == edit.uid]
    if not hits or edit.by < 1:
      raise InvalidSpec(f"no layer {edit.uid!r}")
    layers[hits[0]] = _widen_layer(layers[hits[0]], edit.by, isinstance(edit, WidenHeadDim))
    return dataclasses.replace(spec, layers=tuple(layers))
  if isinstance(edit, InsertBlock):
    if edit.layer.uid in {l.uid for l in spec.layers} or not 0 <= edit.at <= len(spec.layers):
      raise InvalidSpec("bad block insertion")
    return dataclasses.replace(spec, layers=spec.layers[:edit.at] + (edit.layer,) + spec.layers[edit.at:])
  if isinstance(edit, GrowVocab):
    if not spec.vocab or edit.by < 1:
      raise InvalidSpec("no vocabulary")
    return dataclasses.replace(spec, vocab=spec.vocab + edit.by)
  if isinstance(edit, GrowOutput):
    return dataclasses.replace(spec, out=spec.out + edit.by)
  raise InvalidSpec(f"unknown edit {edit!r}")


def apply_edits(spec: ModelSpec, edits) -> ModelSpec:
  for e in edits:
    spec = apply_edit(spec, e)
  return spec


# -- building ------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
  """One parameter: shape, the flat (C-order) label of every element, how it is drawn.

  ``key`` (layer uid, parameter name) pairs the leaves of the old and the new model.
  """
  path: str
  key: tuple[str, str]
  shape: tuple[int, ...]
  labels: tuple[Any, ...]
  init: str = "normal"


@dataclass
class Model:
  spec: ModelSpec
  fn: Callable
  inputs: dict[str, jax.ShapeDtypeStruct]
  features: dict[str, Any]
  leaves: dict[str, Leaf]

  def init(self, seed: int) -> dict:
    """Random parameters; every element differs from every other (exact placement is checkable)."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, leaf in self.leaves.items():
      x = rng.normal(size=leaf.shape) * 0.5
      if leaf.init == "gain":
        x = 1.0 + 0.6 * x
      name, pname = path.split("/")
      params.setdefault(name, {})[pname] = jnp.asarray(x, jnp.float32)
    return params

  def abstract_params(self) -> dict:
    out: dict = {}
    for path, leaf in self.leaves.items():
      name, pname = path.split("/")
      out.setdefault(name, {})[pname] = jax.ShapeDtypeStruct(leaf.shape, jnp.float32)
    return out


def _product(*axes) -> tuple:
  return tuple(itertools.product(*axes))


class _Layout:
  """Collects the leaves of one model while the stream's feature-axis labels are followed."""

  def __init__(self, spec: ModelSpec):
    self.spec = spec
    self.leaves: dict[str, Leaf] = {}

  def add(self, name: str, uid: str, pname: str, shape, labels, init="normal"):
    labels = tuple(labels)
    assert len(labels) == math.prod(shape), (name, pname, shape, len(labels))
    path = f"{name}/{pname}"
    self.leaves[path] = Leaf(path, (uid, pname), tuple(shape), labels, init)


def layer_name(spec: ModelSpec, i: int) -> str:
  """Parameter dict key of layer ``i`` (``len(layers)`` is the head)."""
  if spec.naming == "index":
    return f"layer_{i}"
  return spec.layers[i].uid if i < len(spec.layers) else "head"


def _units(uid, n):
  return [(uid, j) for j in range(n)]


def _gates(uid, g, n):
  return [(uid, k, j) for k in range(g) for j in range(n)]


def _gate_count(cell: str) -> int:
  return {"elman": 1, "gru": 3, "gru_uneven": 3, "lstm": 4}[cell]


def _conv_groups(layer: Conv, cin: int) -> int:
  g = cin if layer.groups == 0 else layer.groups
  if cin % g or layer.channels % g:
    raise InvalidSpec(f"conv {layer.uid}: {cin} inputs, {layer.channels} channels, {g} groups")
  return g


def _layout_conv(lay: _Layout, name: str, layer: Conv, space, size):
  g = _conv_groups(layer, len(space))
  cin_g, cpg = len(space) // g, layer.channels // g
  out = [(layer.uid, o // cpg, o % cpg) for o in range(layer.channels)]
  taps = [("tap", a, b) for a in range(layer.kernel) for b in range(layer.kernel)]
  # grouped: the kernel's input axis holds the inputs of the output channel's group
  label = lambda t, i, o: (taps[t], space[(o // cpg) * cin_g + i], out[o])
  k, n = layer.kernel, layer.channels
  if lay.spec.layout == "NHWC":  # HWIO
    labels = [label(t, i, o) for t in range(k * k) for i in range(cin_g) for o in range(n)]
    shape = (k, k, cin_g, n)
  else:  # OIHW
    labels = [label(t, i, o) for o in range(n) for i in range(cin_g) for t in range(k * k)]
    shape = (n, cin_g, k, k)
  lay.add(name, layer.uid, "kernel", shape, labels)
  lay.add(name, layer.uid, "bias", (layer.channels,), out)
  return out, -(-size // layer.stride)


def _layout_layer(lay: _Layout, name: str, layer, space):
  uid = layer.uid
  if isinstance(layer, Dense):
    units = _units(uid, layer.width)
    lay.add(name, uid, "w", (len(space), layer.width), _product(space, units))
    lay.add(name, uid, "b", (layer.width,), units)
    return units
  if isinstance(layer, Norm):
    lay.add(name, uid, "gain", (len(space),), space, init="gain")
    if layer.kind == "ln":
      lay.add(name, uid, "bias", (len(space),), space)
    return space
  if isinstance(layer, Residual):
    if layer.pre_norm:
      lay.add(name, uid, "ln_gain", (len(space),), space, init="gain")
      lay.add(name, uid, "ln_bias", (len(space),), space)
    units = _units(uid, layer.width)
    lay.add(name, uid, "w1", (len(space), layer.width), _product(space, units))
    lay.add(name, uid, "b1", (layer.width,), units)
    lay.add(name, uid, "w2", (layer.width, len(space)), _product(units, space))
    lay.add(name, uid, "b2", (len(space),), space)
    return space
  if isinstance(layer, Attention):
    heads = [(uid, h, d) for h in range(layer.heads) for d in range(layer.head_dim)]
    for p in ("q", "k", "v"):
      lay.add(name, uid, p, (len(space), len(heads)), _product(space, heads))
    lay.add(name, uid, "o", (len(heads), len(space)), _product(heads, space))
    return space
  if isinstance(layer, Positions):
    if layer.rows < lay.spec.length:
      raise InvalidSpec("positional table shorter than the sequence")
    lay.add(name, uid, "table", (layer.rows, len(space)), _product([("pos", t) for t in range(layer.rows)], space))
    return space
  if isinstance(layer, RNN):
    g, units = _gate_count(layer.cell), _units(uid, layer.hidden)
    gates = _gates(uid, g, layer.hidden)
    lay.add(name, uid, "wi", (len(space), len(gates)), _product(space, gates))
    lay.add(name, uid, "wh", (layer.hidden, len(gates)), _product(units, gates))
    lay.add(name, uid, "b", (len(gates),), gates)
    return units
  raise InvalidSpec(f"no layout for {layer!r}")


_LAYERS_OF = {"vec": (Dense, Norm, Residual), "seq": (Dense, Norm, Residual, Attention, Positions, RNN),
              "img": (Dense, Norm, Residual, Conv)}


def _check_spec(spec: ModelSpec):
  if spec.kind not in _LAYERS_OF or spec.layout not in ("NHWC", "NCHW") or spec.pool not in ("mean", "flatten"):
    raise InvalidSpec("bad kind/layout/pool")
  if not spec.features or len(set(spec.features + spec.extra)) != len(spec.features + spec.extra):
    raise InvalidSpec("features must be non-empty and unique")
  if min(spec.out, spec.length, spec.embed) < 1 or spec.vocab < 0:
    raise InvalidSpec("out, length and embed must be >= 1")
  if spec.kind == "img" and (spec.extra or spec.vocab):
    raise InvalidSpec("image models have one input leaf")
  seen_dense = False
  for layer in spec.layers:
    if not isinstance(layer, _LAYERS_OF[spec.kind]):
      raise InvalidSpec(f"{type(layer).__name__} in a {spec.kind} model")
    if isinstance(layer, Conv) and seen_dense:
      raise InvalidSpec("convolutions come first")
    seen_dense |= not isinstance(layer, Conv)
    for f in ("width", "heads", "head_dim", "hidden", "channels", "rows", "kernel", "stride", "dilation"):
      if getattr(layer, f, 1) < 1:
        raise InvalidSpec(f"{f} < 1")
  if len({l.uid for l in spec.layers} | {"head", "embed"}) != len(spec.layers) + 2:
    raise InvalidSpec("layer uids must be unique")


def _input_space(spec: ModelSpec):
  space = [("feat", n) for n in spec.features + spec.extra]
  if spec.vocab:
    space += [("emb", j) for j in range(spec.embed)]
  return space


def layout(spec: ModelSpec) -> dict[str, Leaf]:
  """The parameter leaves of ``spec`` with their element labels."""
  _check_spec(spec)
  lay = _Layout(spec)
  if spec.vocab:
    lay.add("embed", "embed", "table", (spec.vocab, spec.embed),
            _product([("tok", v) for v in range(spec.vocab)], [("emb", j) for j in range(spec.embed)]))
  space, size, pooled = _input_space(spec), IMAGE, spec.kind != "img"
  for i, layer in enumerate(spec.layers):
    if isinstance(layer, Conv):
      space, size = _layout_conv(lay, layer_name(spec, i), layer, space, size)
      continue
    if not pooled:
      space, pooled = _pool_space(spec, space, size), True
    space = _layout_layer(lay, layer_name(spec, i), layer, space)
  if not pooled:
    space = _pool_space(spec, space, size)
  outs = [("out", j) for j in range(spec.out)]
  name = layer_name(spec, len(spec.layers))
  lay.add(name, "head", "w", (len(space), spec.out), _product(space, outs))
  lay.add(name, "head", "b", (spec.out,), outs)
  return lay.leaves



def _pool_space(spec: ModelSpec, space, size):
  if spec.pool == "mean":
    return space
  pixels = [("px", a, b) for a in range(size) for b in range(size)]
  if spec.layout == "NHWC":
    return [(p, c) for p in pixels for c in space]
  return [(c, p) for c in space for p in pixels]


# -- forward ---------------------------------------------------------------------------

def _layer_norm(h, gain, bias, eps=1e-5):
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  out = (h - mu) * jax.lax.rsqrt(var + eps) * gain
  return out if bias is None else out + bias


def _rms_norm(h, gain, eps=1e-5):
  return h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + eps) * gain


def _attention(p, h, layer: Attention):
  b, t, _ = h.shape
  split = lambda z: z.reshape(b, t, layer.heads, layer.head_dim)
  q, k, v = split(h @ p["q"]), split(h @ p["k"]), split(h @ p["v"])
  scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(layer.head_dim)
  if layer.causal:
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
  a = jax.nn.softmax(scores, axis=-1)
  o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, layer.heads * layer.head_dim)
  return h + o @ p["o"]


def _cell(layer: RNN, p, carry, x):
  hsz = layer.hidden
  if layer.cell == "elman":
    h = jnp.tanh(x @ p["wi"] + carry @ p["wh"] + p["b"])
    return h, h
  if layer.cell == "lstm":
    h, c = carry
    i, f, g, o = jnp.split(x @ p["wi"] + h @ p["wh"] + p["b"], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  h = carry
  if layer.cell == "gru":
    xr, xz, xn = jnp.split(x @ p["wi"] + p["b"], 3, axis=-1)
    hr, hz, hn = jnp.split(h @ p["wh"], 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    h = (1 - z) * jnp.tanh(xn + r * hn) + z * h
    return h, h
  # Haiku's GRU: the fused axis is cut [2H | H], and the 2H part in halves
  wh_zr, wh_a = jnp.split(p["wh"], [2 * hsz], axis=1)
  b_zr, b_a = jnp.split(p["b"], [2 * hsz], axis=0)
  zr_x, a_x = jnp.split(x @ p["wi"], [2 * hsz], axis=-1)
  z, r = jnp.split(jax.nn.sigmoid(zr_x + h @ wh_zr + b_zr), 2, axis=-1)
  a = jnp.tanh(a_x + (r * h) @ wh_a + b_a)
  h = (1 - z) * h + z * a
  return h, h


def _rnn(p, h, layer: RNN):
  b = h.shape[0]
  zero = jnp.zeros((b, layer.hidden), h.dtype)
  carry = (zero, zero) if layer.cell == "lstm" else zero
  _, ys = jax.lax.scan(lambda c, x: _cell(layer, p, c, x), carry, jnp.swapaxes(h, 0, 1))
  return jnp.swapaxes(ys, 0, 1)


def _conv(p, h, layer: Conv, spec: ModelSpec):
  nhwc = spec.layout == "NHWC"
  cin = h.shape[-1] if nhwc else h.shape[1]
  dn = ("NHWC", "HWIO", "NHWC") if nhwc else ("NCHW", "OIHW", "NCHW")
  y = jax.lax.conv_general_dilated(
      h, p["kernel"], (layer.stride,) * 2, "SAME", rhs_dilation=(layer.dilation,) * 2,
      dimension_numbers=dn, feature_group_count=_conv_groups(layer, cin))
  return jax.nn.relu(y + (p["bias"] if nhwc else p["bias"][:, None, None]))


def _pool(spec: ModelSpec, h):
  if spec.pool == "flatten":
    return h.reshape(h.shape[0], -1)
  return h.mean((1, 2) if spec.layout == "NHWC" else (2, 3))


def _apply_layer(spec: ModelSpec, p, h, layer):
  if isinstance(layer, Dense):
    return jnp.tanh(h @ p["w"] + p["b"])
  if isinstance(layer, Norm):
    return _layer_norm(h, p["gain"], p["bias"]) if layer.kind == "ln" else _rms_norm(h, p["gain"])
  if isinstance(layer, Residual):
    z = _layer_norm(h, p["ln_gain"], p["ln_bias"]) if layer.pre_norm else h
    return h + jnp.tanh(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  if isinstance(layer, Attention):
    return _attention(p, h, layer)
  if isinstance(layer, Positions):
    return h + jnp.take(p["table"], jnp.arange(h.shape[1]), axis=0)
  if isinstance(layer, RNN):
    return _rnn(p, h, layer)
  if isinstance(layer, Conv):
    return _conv(p, h, layer, spec)
  raise InvalidSpec(f"no forward for {layer!r}")


def forward(spec: ModelSpec, params, inputs):
  parts = [inputs["x"]] + ([inputs["y"]] if spec.extra else [])
  if spec.vocab:
    parts.append(params["embed"]["table"][inputs["ids"]])
  h = jnp.concatenate(parts, -1) if len(parts) > 1 else parts[0]
  pooled = spec.kind != "img"
  for i, layer in enumerate(spec.layers):
    if not pooled and not isinstance(layer, Conv):
      h, pooled = _pool(spec, h), True
    h = _apply_layer(spec, params[layer_name(spec, i)], h, layer)
  if not pooled:
    h = _pool(spec, h)
  if spec.kind == "seq":
    h = h[:, -1]
  head = params[layer_name(spec, len(spec.layers))]
  return h @ head["w"] + head["b"]


def _inputs(spec: ModelSpec):
  f32, i32 = jnp.float32, jnp.int32
  if spec.kind == "img":
    c = len(spec.features)
    shape = (BATCH, IMAGE, IMAGE, c) if spec.layout == "NHWC" else (BATCH, c, IMAGE, IMAGE)
    axis = -1 if spec.layout == "NHWC" else 1
    return {"x": jax.ShapeDtypeStruct(shape, f32)}, {"x": js.Features(list(spec.features), axis=axis)}
  lead = (BATCH, spec.length) if spec.kind == "seq" else (BATCH,)
  inputs = {"x": jax.ShapeDtypeStruct(lead + (len(spec.features),), f32)}
  feats: dict[str, Any] = {"x": js.Features(list(spec.features))}
  if spec.extra:
    inputs["y"] = jax.ShapeDtypeStruct(lead + (len(spec.extra),), f32)
    feats["y"] = js.Features(list(spec.extra))
  if spec.vocab:
    inputs["ids"] = jax.ShapeDtypeStruct(lead, i32)
    feats["ids"] = "ids"
  return inputs, feats


def build(spec: ModelSpec) -> Model:
  """The model ``spec`` describes; :class:`InvalidSpec` if it describes none."""
  leaves = layout(spec)
  inputs, feats = _inputs(spec)
  fn = lambda params, x: forward(spec, params, x)
  model = Model(spec, fn, inputs, feats, leaves)
  try:  # shapes must agree: a layout/forward mismatch is a bug in this file, not in the library
    jax.eval_shape(fn, model.abstract_params(), inputs)
  except InvalidSpec:
    raise
  except (TypeError, ValueError, IndexError) as e:
    raise AssertionError(f"fuzz_models cannot run {spec!r}: {e}") from e
  return model


def grouped_inputs_changed(old: Model, new: Model) -> bool:
  """A grouped conv whose output channels read other inputs than before: its groups mix, and no
  transfer by labels is exact (the generator avoids such pairs)."""
  def reads(model):
    out = {}
    for layer in model.spec.layers:
      if isinstance(layer, Conv) and layer.groups != 1:
        leaf = next(l for l in model.leaves.values() if l.key == (layer.uid, "kernel"))
        for _, inp, outp in leaf.labels:
          out.setdefault((layer.uid, outp), set()).add(inp)
    return out
  a, b = reads(old), reads(new)
  return any(k in b and a[k] != b[k] for k in a)


# -- the transfer an edit implies --------------------------------------------------------

@dataclass
class Expected:
  """Per new leaf: the flat old index of every element (-1: fresh) and the old path;
  per old leaf: which elements the edit keeps."""
  source: dict[str, tuple[str | None, np.ndarray]]
  kept: dict[str, np.ndarray]


def expected_transfer(old: Model, new: Model) -> Expected:
  old_by_key = {leaf.key: leaf for leaf in old.leaves.values()}
  new_by_key = {leaf.key: leaf for leaf in new.leaves.values()}
  source = {}
  for path, leaf in new.leaves.items():
    prev = old_by_key.get(leaf.key)
    if prev is None:
      source[path] = (None, np.full(len(leaf.labels), -1))
      continue
    index = {lab: i for i, lab in enumerate(prev.labels)}
    source[path] = (prev.path, np.array([index.get(lab, -1) for lab in leaf.labels]))
  kept = {}
  for path, leaf in old.leaves.items():
    succ = new_by_key.get(leaf.key)
    labels = set(succ.labels) if succ is not None else set()
    kept[path] = np.array([lab in labels for lab in leaf.labels]).reshape(leaf.shape)
  return Expected(source, kept)


# -- checking a surgery -------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
  """One broken invariant. ``check`` is the class: ``crash``, ``preserved but verify fails``,
  ``misplaced``, ``dropped while preserved``, ``needless drop``, ``unreported drop``, ``fresh not init``;
  ``where`` the kind of parameter it concerns (``Norm.gain``, ``RNN[gru_uneven].wi``...)."""
  check: str
  detail: str
  where: str = ""

  def __str__(self):
    return f"{self.check} [{self.where}]: {self.detail}" if self.where else f"{self.check}: {self.detail}"


def leaf_kind(model: Model, path: str) -> str:
  """What a leaf belongs to, for grouping failures: ``Residual.w2``, ``RNN[gru_uneven].wi``, ``head[flatten].w``."""
  uid, pname = model.leaves[path].key
  layer = next((l for l in model.spec.layers if l.uid == uid), None)
  if layer is None:
    extra = f"[{model.spec.pool}]" if uid == "head" and model.spec.kind == "img" else ""
    return f"{uid}{extra}.{pname}"
  tag = f"[{layer.cell}]" if isinstance(layer, RNN) else ""
  return f"{type(layer).__name__}{tag}.{pname}"


def _leaf(tree, path):
  name, pname = path.split("/")
  return np.asarray(tree[name][pname])


def _flat_index(shape, i):
  return tuple(int(v) for v in np.unravel_index(i, shape))


def _scaled(got, want) -> np.ndarray:
  """``got == c * want`` for one positive ``c`` per leaf (a recipe's rescaled gains): where not."""
  nonzero = want != 0
  if not nonzero.any():
    return got != want
  c = np.median(got[nonzero] / want[nonzero])
  return ~np.isclose(got, c * want, rtol=1e-5, atol=1e-7) | (c <= 0)


def _leaf_placement(old: Model, new: Model, path, old_p, new_init, new_p, source, dropped,
                    exact: bool = True) -> list[Failure]:
  """Carried elements hold their old value (``exact=False`` and a resized leaf: up to one positive
  factor per leaf); fresh ones their init or zero (not checked then: recipes compute them)."""
  out = []
  old_path, src = source
  # recipes rescale only leaves on a resized axis: a leaf of unchanged shape is always an exact copy
  exact = exact or (old_path is not None and old.leaves[old_path].shape == new.leaves[path].shape)
  got, init = _leaf(new_p, path).ravel(), _leaf(new_init, path).ravel()
  bad_fresh = (src < 0) & (got != init) & (got != 0) & exact
  if bad_fresh.any():
    i = int(np.argmax(bad_fresh))
    out.append(Failure("fresh not init", f"{path}{_flat_index(new.leaves[path].shape, i)} is neither its init nor 0",
                       leaf_kind(new, path)))
  if old_path is None:
    return out
  carried = src >= 0
  if old_path in dropped:  # reported as dropped: judged by the drop check instead
    carried &= ~dropped[old_path].ravel()[np.maximum(src, 0)]
  want = _leaf(old_p, old_path).ravel()[np.maximum(src, 0)]
  wrong = carried & ((got != want) if exact else _scaled(np.where(carried, got, 0), np.where(carried, want, 0)))
  if wrong.any():
    i = int(np.argmax(wrong))
    value = "old value" if exact else "old value (up to one factor)"
    out.append(Failure("misplaced", (
        f"{path}: {int(wrong.sum())} of {int(carried.sum())} carried elements are not their {value}; "
        f"first {path}{_flat_index(new.leaves[path].shape, i)} should hold "
        f"{old_path}{_flat_index(old.leaves[old_path].shape, int(src[i]))}"), leaf_kind(new, path)))
  return out


def _leaf_drops(old: Model, path, kept, dropped, preserved) -> list[Failure]:
  """The report drops exactly the elements the edit removes."""
  out = []
  reported = dropped.get(path, np.zeros(kept.shape, bool))
  lost = reported & kept
  if lost.any():
    check = "dropped while preserved" if preserved is True else "needless drop"
    out.append(Failure(check, f"{path}: {int(lost.sum())} trained elements that the edit keeps are dropped "
                              f"(first {_flat_index(kept.shape, int(np.argmax(lost.ravel())))})", leaf_kind(old, path)))
  hidden = ~reported & ~kept
  if hidden.any():
    out.append(Failure("unreported drop", f"{path}: {int(hidden.sum())} elements that the edit removes "
                                          f"are not in report.dropped_elements()", leaf_kind(old, path)))
  return out


def placement_failures(old: Model, new: Model, old_p, new_init, new_p, report, expected: Expected,
                       exact: bool = True) -> list[Failure]:
  """Moved values are exactly where the labels say; fresh ones are the init or zero; the drops
  the report lists are exactly what the edit removed, and none while ``preserved``. With
  ``exact=False`` (a widening recipe other than zeros), carried values may be rescaled per leaf
  and fresh ones computed."""
  dropped = report.dropped_elements()
  out = []
  for path, source in expected.source.items():
    out += _leaf_placement(old, new, path, old_p, new_init, new_p, source, dropped, exact)
  for path, kept in expected.kept.items():
    out += _leaf_drops(old, path, kept, dropped, report.preserved)
  return out


def transfer_by_labels(old: Model, new: Model, old_p, new_init):
  """The new parameters the labels imply: old values where the edit keeps them, ``new_init`` elsewhere.

  The oracle's own check: for edits that only move features, this is an exact transfer.
  """
  out: dict = {}
  for path, (old_path, src) in expected_transfer(old, new).source.items():
    value = _leaf(new_init, path).ravel().copy()
    if old_path is not None:
      value[src >= 0] = _leaf(old_p, old_path).ravel()[src[src >= 0]]
    name, pname = path.split("/")
    out.setdefault(name, {})[pname] = jnp.asarray(value.reshape(new.leaves[path].shape))
  return out


def random_inputs(model: Model, seed: int):
  """Random inputs for ``model``; ``x``/``y`` columns are drawn per feature name, so two models
  given the same seed agree on every feature they share."""
  out = {}
  for leaf_name, sds in model.inputs.items():
    if leaf_name == "ids":
      out[leaf_name] = jnp.asarray(np.random.default_rng(seed).integers(0, 3, sds.shape), jnp.int32)
      continue
    spec = model.features[leaf_name]
    axis = spec.axis % len(sds.shape)
    cols = []
    for name in spec.names:
      rng = np.random.default_rng([seed, int.from_bytes(name.encode(), "little")])
      cols.append(rng.normal(size=sds.shape[:axis] + sds.shape[axis + 1:]))
    out[leaf_name] = jnp.asarray(np.stack(cols, axis), jnp.float32)
  return out


def view(fn, width):
  """The model's outputs restricted to the first ``width`` (the old outputs when the head grew)."""
  return lambda p, x: fn(p, x)[..., :width]


def _crash(stage, e) -> Failure:
  where = traceback.extract_tb(e.__traceback__)[-1]
  return Failure("crash", f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:160]} "
                          f"(at {where.filename.split('/')[-1]}:{where.lineno})")


def make_pair(old_spec: ModelSpec, edits) -> tuple[Model, Model]:
  """Both models of a case; :class:`InvalidSpec` if the edit does not make a valid pair."""
  old, new = build(old_spec), build(apply_edits(old_spec, edits))
  if grouped_inputs_changed(old, new):
    raise InvalidSpec("a grouped conv's inputs changed")
  return old, new


def plan_options(widen: str | None) -> dict:
  """``widen=`` for ``js.plan`` when this version of the planner has it (issue 9's recipes)."""
  has_widen = "widen" in inspect.signature(js.plan).parameters
  return {"widen": widen} if widen and has_widen else {}


def check_pair(old_spec: ModelSpec, edits=(), *, seed: int = 0, samples: int = 3,
               numeric: bool = True, widen: str | None = None) -> list[Failure]:
  """Plans ``old_spec -> apply_edits(old_spec, edits)`` through the public API and returns every
  broken invariant (empty when all hold). :class:`InvalidSpec` if the case is not valid.

  ``numeric=False`` skips ``js.verify`` (the slow part) when only the placement matters.
  ``widen`` is passed to ``js.plan`` where it exists (``None``: the planner's default). A planner
  with widening recipes (issue 9: rescaled gains, means, clones) is checked up to one positive
  factor per leaf, and its fresh values are not checked; one without is checked exactly.
  """
  old, new = make_pair(old_spec, edits)
  width = min(old.spec.out, new.spec.out)
  old_fn, new_fn = view(old.fn, width), view(new.fn, width)
  old_p, new_init = old.init(seed), new.init(seed + 1)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      old_t = js.dependency_table(old_fn, old.abstract_params(), old.inputs, old.features, strict=True)
      new_t = js.dependency_table(new_fn, new.abstract_params(), new.inputs, new.features, strict=True)
  except Exception as e:  # noqa: BLE001  (a crash is a finding, reported like the others)
    return [_crash("dependency_table", e)]
  try:
    options = plan_options(widen)
    surgery = js.plan(old_t, new_t, **options)
    new_p = surgery(old_p, new_init)
  except Exception as e:  # noqa: BLE001
    return [_crash("plan", e)]
  report = surgery.report
  exact = not plan_options("zero")  # a planner without recipes copies old values unchanged
  failures = placement_failures(old, new, old_p, new_init, new_p, report, expected_transfer(old, new), exact)
  if report.preserved is True and numeric:
    try:
      check = js.verify(surgery, old_fn, new_fn, old_p, new_p, old.inputs, new.inputs,
                        key=jax.random.key(seed), samples=samples, atol=ATOL)
    except Exception as e:  # noqa: BLE001
      return failures + [_crash("verify", e)]
    if not check.ok:
      worst = max(check.max_abs_diff.values())
      failures.append(Failure("preserved but verify fails", f"report.preserved is True, max |old - new| = {worst:.3g}"))
  return failures


def signature(failure: Failure) -> str:
  """A coarse class for grouping failures in a campaign: the check and the layer kind; for crashes
  the error and where it was raised. A fresh element holding an old value is a misplacement."""
  if failure.check == "crash":
    head = failure.detail.split(" (at ")
    return "crash: " + "".join("#" if c.isdigit() else c for c in head[0][:100]) + " (at " + head[-1]
  check = "misplaced" if failure.check == "fresh not init" else failure.check
  return f"{check} [{failure.where.split('.')[0]}]" if failure.where else check


def reproducer(old_spec: ModelSpec, edits) -> str:
  return f"check_pair({old_spec!r}, {tuple(edits)!r})"


# -- hypothesis strategies ----------------------------------------------------------------


LAYER_TYPES = (Dense, Norm, Residual, Attention, Positions, RNN, Conv)
EDIT_TYPES = (InsertFeature, RemoveFeature, PermuteFeatures, MoveFeature, Widen, WidenHeadDim, InsertBlock,
              GrowVocab, GrowOutput)


CELLS = ("elman", "gru", "gru_uneven", "lstm")


def _layer(draw, cls, uid: str, length: int, cin: int, cells=CELLS):
  ints = lambda lo, hi: draw(st.integers(lo, hi))
  if cls is Dense:
    return Dense(uid, ints(2, 5))
  if cls is Norm:
    return Norm(uid, draw(st.sampled_from(["ln", "rms"])))
  if cls is Residual:
    return Residual(uid, ints(2, 4), draw(st.booleans()))
  if cls is Attention:
    return Attention(uid, ints(1, 2), ints(1, 3), draw(st.booleans()))
  if cls is Positions:
    return Positions(uid, length + ints(0, 3))
  if cls is RNN:
    return RNN(uid, ints(2, 4), draw(st.sampled_from(list(cells))))
  groups = draw(st.sampled_from([1, 1, 2, 0]))
  g = cin if groups == 0 else groups
  if cin % g:
    groups, g = 1, 1
  return Conv(uid, g * ints(1, 3) if groups != 1 else ints(2, 5), draw(st.sampled_from([1, 3])),
              draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), groups)


@st.composite
def model_specs(draw, kinds=("vec", "seq", "img"), layer_types=LAYER_TYPES, max_layers: int = 3,
                front=None, cells=CELLS) -> ModelSpec:
  """Small random models: 1-4 features, up to ``max_layers`` layers of ``layer_types``, RNN cells
  of ``cells``; with ``front`` (layer types), vec and seq models start with one of those."""
  kind = draw(st.sampled_from(kinds))
  features = tuple(f"f{i}" for i in range(draw(st.integers(1, 4))))
  extra = () if kind == "img" else tuple(f"g{i}" for i in range(draw(st.integers(0, 2))))
  vocab = 0 if kind == "img" else draw(st.sampled_from([0, 0, 3, 5]))
  length = draw(st.integers(2, 4))
  allowed = [c for c in layer_types if c in _LAYERS_OF[kind]]
  layers, cin = [], len(features)
  if kind == "img" and Conv in allowed:
    for i in range(draw(st.integers(1, 2))):
      layers.append(_layer(draw, Conv, f"L{i}", length, cin))
      cin = layers[-1].channels
    allowed = [c for c in allowed if c is not Conv]
  if front and kind != "img":
    first = draw(st.sampled_from([c for c in front if c in _LAYERS_OF[kind]]))
    layers.append(_layer(draw, first, "L0", length, cin, cells))
  if allowed:
    for _ in range(draw(st.integers(0, max_layers - len(layers)))):
      layers.append(_layer(draw, draw(st.sampled_from(allowed)), f"L{len(layers)}", length, cin, cells))
  return ModelSpec(kind=kind, features=features, extra=extra, vocab=vocab, layers=tuple(layers),
                   out=draw(st.integers(1, 3)), naming=draw(st.sampled_from(["uid", "index"])), length=length,
                   layout=draw(st.sampled_from(["NHWC", "NCHW"])), pool=draw(st.sampled_from(["mean", "flatten"])))


def _edit(draw, spec: ModelSpec, cls, n: int, keep_front: bool = False):
  leaves = ["x"] + (["y"] if spec.extra else [])
  leaf = draw(st.sampled_from(leaves))
  names = spec.features if leaf == "x" else spec.extra
  if cls is InsertFeature:
    return InsertFeature(leaf, draw(st.integers(0, len(names))), f"n{n}")
  if cls is RemoveFeature:
    return RemoveFeature(leaf, draw(st.integers(0, len(names) - 1)))
  if cls is PermuteFeatures:
    return PermuteFeatures(leaf, tuple(draw(st.permutations(range(len(names))))))
  if cls is MoveFeature:
    return MoveFeature(draw(st.integers(0, len(spec.features) - 1)), draw(st.integers(0, len(spec.extra))))
  if cls in (Widen, WidenHeadDim):
    kinds = (Attention,) if cls is WidenHeadDim else (Dense, Residual, RNN, Attention, Conv)
    uids = [l.uid for l in spec.layers if isinstance(l, kinds)]
    assume(uids)
    return cls(draw(st.sampled_from(uids)), draw(st.integers(1, 2)))
  if cls is InsertBlock:
    first = next((i + 1 for i in range(len(spec.layers) - 1, -1, -1) if isinstance(spec.layers[i], Conv)), 0)
    first = max(first, int(keep_front))
    block = draw(st.sampled_from([Residual, Attention] if spec.kind == "seq" else [Residual]))
    layer = _layer(draw, block, f"B{n}", spec.length, 0)
    return InsertBlock(draw(st.integers(first, len(spec.layers))), layer)
  if cls is GrowVocab:
    assume(spec.vocab)
    return GrowVocab(draw(st.integers(1, 3)))
  return GrowOutput(draw(st.integers(1, 2)))


@st.composite
def edit_lists(draw, spec: ModelSpec, edit_types=EDIT_TYPES, max_edits: int = 3, keep_front: bool = False):
  """Up to ``max_edits`` edits that apply one after the other; ``keep_front``: no block before layer 0."""
  edits, current = [], spec
  weighted = list(edit_types) + [Widen] * (Widen in edit_types)  # widening is the most common surgery
  for n in range(draw(st.integers(0, max_edits))):
    edit = _edit(draw, current, draw(st.sampled_from(weighted)), n, keep_front)
    try:
      current = apply_edit(current, edit)
    except InvalidSpec:
      continue
    edits.append(edit)
  return tuple(edits)


@st.composite
def pairs(draw, kinds=("vec", "seq", "img"), layer_types=LAYER_TYPES, edit_types=EDIT_TYPES, max_edits: int = 3,
          front=None, cells=CELLS):
  """``(old_spec, edits)`` that make a valid pair of models (see :func:`model_specs`)."""
  spec = draw(model_specs(kinds, layer_types, front=front, cells=cells))
  edits = draw(edit_lists(spec, edit_types, max_edits, keep_front=bool(front)))
  try:
    make_pair(spec, edits)
  except InvalidSpec:
    assume(False)
  return spec, edits


# The family the planner handles today (tests/test_fuzz.py generates it in CI): features enter
# through a dense layer or an RNN cell, so every later norm, residual or attention acts on units;
# no positional tables, convolutions or unevenly split gates.
CONTRACTION_FIRST = {"kinds": ("vec", "seq"), "layer_types": (Dense, Norm, Residual, Attention, RNN),
                     "front": (Dense, RNN), "cells": ("elman", "gru", "lstm")}
FAMILIES = {"all": {}, "contraction-first": CONTRACTION_FIRST}


# -- failures found by the campaign (scripts/fuzz.py), shrunk -----------------------------------

@dataclass(frozen=True)
class Found:
  """A failing case from a campaign: ``id``, the issue item, one line on what was wrong, and whether
  the planner now gets it right (``fixed``: a plain regression test; else a strict expected failure)."""
  id: str
  item: str
  what: str
  spec: ModelSpec
  edits: tuple = ()

  @property
  def fixed(self) -> bool:
    return self.id not in STILL_FAILING

  @property
  def reason(self) -> str:
    where = f"issue {self.item}" if self.item != "new" else "fuzzer, not in issue 15"
    return f"{where}: {self.what}"


# Findings the planner does not get right yet (strict expected failures).
STILL_FAILING: frozenset[str] = frozenset()

FOUND = (
    Found("layernorm-feature-moved-across-leaves", "15.0",
          "a feature moved from x to y in front of a LayerNorm: gain, bias and head rows stay in place; "
          "reported preserved, verify differs by 0.5",
          ModelSpec(features=("f0", "f1"), extra=("g0",), layers=(Norm("L0"),), out=1), (MoveFeature(0, 0),)),
    Found("rmsnorm-feature-inserted", "15.0",
          "a feature inserted in front of an RMSNorm: the gain and the next kernel's rows do not shift",
          ModelSpec(features=("f0", "f1"), layers=(Norm("L0", "rms"), Dense("L1", 2)), out=1),
          (InsertFeature("x", 1, "n0"),)),
    Found("layernorm-feature-removed", "15.0",
          "a feature removed in front of a LayerNorm: a kept feature's gain, bias and head row are dropped, "
          "the removed one's are carried in its place",
          ModelSpec(features=("f2", "f3"), layers=(Norm("L0"),), out=1), (RemoveFeature("x", 0),)),
    Found("pre-ln-residual-feature-removed", "15.0",
          "a feature removed in front of a pre-LN residual block over the features: every leaf of the block "
          "and the head drops a kept feature and carries the removed one",
          ModelSpec(features=("f0", "f1"), layers=(Residual("L2", 1, pre_norm=True),), out=2),
          (RemoveFeature("x", 0),)),
    Found("residual-then-lstm-feature-inserted", "15.0",
          "a feature inserted behind a residual over the features: the block's output column and bias and "
          "the LSTM's input rows do not shift",
          ModelSpec(kind="seq", features=("f1",), layers=(Residual("L0", 1), RNN("L1", 1, "lstm")), out=2),
          (InsertFeature("x", 0, "n0"),)),
    Found("attention-over-features-permuted", "15.0",
          "features permuted in front of a residual attention block: its output projection's columns and the "
          "head's rows stay in place; reported preserved, verify differs by 1",
          ModelSpec(kind="seq", features=("f0", "f1"), layers=(Attention("L0", 1, 3, causal=True),), out=2),
          (PermuteFeatures("x", (1, 0)),)),
    Found("positions-identity", "15.1",
          "identity surgery: positional row 1, beyond the traced length 1, is dropped while the report says "
          "preserved",
          ModelSpec(kind="seq", features=("f0",), layers=(Positions("L0", 2),), out=1, length=1)),
    Found("depthwise-1x1-widened", "15.2",
          "a depthwise 1x1 conv's channel multiplier grown 1 -> 3: plan crashes (operands could not be "
          "broadcast, novelty pass)",
          ModelSpec(kind="img", features=("f0",), layers=(Conv("L0", 1, kernel=1, groups=0),), out=1),
          (Widen("L0", 2),)),
    Found("gru-uneven-widened", "15.3",
          "a GRU whose fused gates are cut [2H | H], then in halves, widened 2 -> 3: columns aligned as a "
          "prefix, old units land in the wrong gates",
          ModelSpec(kind="seq", features=("f0", "f1"), layers=(RNN("L0", 2, "gru_uneven"),), out=1), (Widen("L0", 1),)),
    Found("block-inserted-before-dense", "new",
          "a residual block inserted on the input features: the next dense layer's rows all lose their "
          "feature signature and are dropped (reported, not preserved)",
          ModelSpec(features=("f0", "f1"), layers=(Dense("L0", 2),), out=1), (InsertBlock(0, Residual("B0", 2)),)),
    Found("block-inserted-before-gru", "new",
          "an attention block inserted on the input features: the GRU's input kernel is dropped whole",
          ModelSpec(kind="seq", features=("f0", "f1"), layers=(RNN("L0", 2, "gru_uneven"),), out=1),
          (InsertBlock(0, Attention("B0", 1, 1)),)),
    Found("pre-ln-block-inserted-on-features", "new",
          "a pre-LN residual block inserted on two input features: the head's trained rows are dropped and "
          "re-initialised, yet the report says preserved (15.1's rule); verify differs by 0.1",
          ModelSpec(features=("f0", "f1"), out=1), (InsertBlock(0, Residual("B1", 1, pre_norm=True)),)),
    Found("block-inserted-after-grouped-conv", "new",
          "a residual block inserted after a grouped 1x1 conv (mean-pooled): the head's rows, whose touch "
          "sets differ per group, are dropped",
          ModelSpec(kind="img", features=("f0", "f1"), layers=(Conv("L0", 2, kernel=1, groups=2),), out=1),
          (InsertBlock(1, Residual("B1", 1)),)),
    Found("block-inserted-and-head-grown", "new",
          "a residual block inserted while the head grows: the old head is matched to the block's first layer "
          "(same shape, other path) instead of the grown head (same path); reported preserved, verify differs",
          ModelSpec(features=("f3",), out=2), (GrowOutput(1), InsertBlock(0, Residual("B1", 2)))),
    Found("layernorm-over-concat-feature-inserted", "new",
          "a feature inserted in front of a LayerNorm over [features | embedding]: the mean demanded of the "
          "embedding segment, which did not grow, became a mean fill of an unchanged table; apply crashed",
          ModelSpec(features=("f1",), vocab=1, embed=1, layers=(Norm("L0"),), out=1), (InsertFeature("x", 0, "n1"),)),
)
