"""Gradient mapping (the paper's second method): the feature→parameter table from gradients.

:func:`gradient_table` builds a :class:`FeatureTable` from gradients: from a base
input (zeros unless given), each feature is switched on alone and a random
projection of the outputs is differentiated with respect to every parameter;
the parameter elements whose gradient changes are marked with the feature.
Parameters are random (fresh draws, several runs) so that dead units or
zero-initialised weights cannot hide an interaction, and one *annihilating* run
zeroes the parameters that give feature-dependent values a nonzero base (added
biases and means, embedding rows gathered at the base id).

Besides the output gradients, the probe records evidence per run, stored with
the table (``FeatureTable.evidence``, a :class:`ProbeEvidence`):

* the *contact-local gradient* (:mod:`jaxsurgery._src.probe.contact`): its
  gradient ``sum_c J_c^T u_c`` over the first contacts ``c`` with fixed
  pseudo-random cotangents ``u_c`` sees the first-contact Jacobians and nothing
  downstream of them. It changes with a feature exactly when a first-contact
  partner of the element changes with it;
* whether that contact-local gradient is nonzero at the base ("live"): a
  parameter whose first contact is annihilated at the base (a kernel row times
  a zero input) cannot have its output gradient changed by anything but its own
  first-contact features. The probe table reads such elements from the runs
  where they are annihilated; what live runs add is kept as evidence.

The steps: :func:`_setup` (trace, check the arguments), :func:`_plan_columns`
(one column per float feature and per probed id, chunked), per run
:func:`_prepare_run` (draw, redraw, annihilate) and :func:`_run_chunks`, then
:func:`_assemble`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurgery._src import progress
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import UnknownNameError
from jaxsurgery._src.core.table import FeatureTable, Traced, assemble, output_layout, trace
from jaxsurgery._src.probe import compile as C
from jaxsurgery._src.probe import walk
from jaxsurgery._src.probe.evidence import ProbeEvidence, bits1
from jaxsurgery._src.probe.static import StaticWalk, static_walk


class _Progress:
  """A tqdm bar over the probe's chunks (see :mod:`jaxsurgery._src.progress`)."""

  def __init__(self, total: int, enabled: bool | None, what: str):
    self.bar = progress.bar(total=total, desc=f"jaxsurgery.gradient_table({what})", unit="chunk",
                            enabled=enabled)

  def step(self, label: str):
    self.bar.set_postfix_str(label)
    self.bar.update(1)

  def close(self):
    self.bar.close()


def _as_key(key):
  if key is None:
    raise ValueError(
        "gradient_table needs a random key for its parameter draws: pass `key=jax.random.key(0)` "
        "(any seed). The probe draws fresh random parameters so that dead units and zero weights "
        "cannot hide an interaction.")
  try:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  except Exception:
    raise TypeError(f"`key` must be a jax random key (jax.random.key(seed)); got {key!r}.") from None


def _np_rng(key) -> np.random.Generator:
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64))


def _check_base(base, inputs, ipaths, ileaves):
  if base is None:
    return [np.zeros(tuple(l.shape), l.dtype) for l in ileaves]
  bleaves, bdef = jax.tree_util.tree_flatten_with_path(base)
  idef = jax.tree_util.tree_structure(inputs)
  bpaths = [feats.keystr(p) for p, _ in bleaves]
  if bdef != idef:  # type: ignore[operator]  # PyTreeDef has __eq__; its stub does not say
    raise ValueError(
        "`base` must be a pytree with the same structure as `inputs`.\n"
        f"  base leaves:   {[p or '<root>' for p in bpaths]}\n"
        f"  inputs leaves: {[p or '<root>' for p in ipaths]}")
  out = []
  for path, (_, b), l in zip(ipaths, bleaves, ileaves):
    shape, dtype = feats.leaf_shape_dtype(b, "base", path)
    if isinstance(b, jax.ShapeDtypeStruct):
      raise TypeError(f"`base` leaf {path or '<root>'!r} is a ShapeDtypeStruct; the base must be concrete arrays.")
    if tuple(shape) != tuple(l.shape):
      raise ValueError(f"`base` leaf {path or '<root>'!r} has shape {tuple(shape)} but the input leaf has "
                       f"shape {tuple(l.shape)}.")
    out.append(np.asarray(b).astype(l.dtype))
  return out


def _draw_params(rng: np.random.Generator, pleaves, concrete, positive: bool, kept: Sequence[bool],
                 fan_in: bool = False):
  """Random float leaves as numpy arrays; kept and non-float leaves keep their values.

  ``fan_in``: divide leaves of rank >= 2 by their fan-in (all axes but the last), so that sums
  of positive terms stay O(1) through the layers instead of saturating tanh/sigmoid.
  """
  out = []
  for l, c, k in zip(pleaves, concrete, kept):
    if k:
      out.append(np.asarray(c))
    elif np.issubdtype(l.dtype, np.inexact):
      x = rng.standard_normal(tuple(l.shape))
      if positive:
        x = np.abs(x) + 0.1
      if fan_in and len(l.shape) >= 2:
        x = x / max(1, int(np.prod(l.shape[:-1], dtype=np.int64)))
      out.append(np.asarray(x, dtype=l.dtype))
    else:  # integer / bool parameters: kept (or zeros for abstract leaves); never differentiated
      out.append(np.zeros(tuple(l.shape), l.dtype) if c is None else np.asarray(c))
  return out


def _feature_sites(spec: feats.ResolvedSpec):
  """Feature index -> [(input leaf index, position along the feature axis or None)]."""
  sites: dict[int, list[tuple[int, int | None]]] = {k: [] for k in range(spec.num_features)}
  for li, leaf in enumerate(spec.leaves):
    if not leaf.feature_ids:
      continue
    if leaf.axis is None:
      sites[leaf.feature_ids[0]].append((li, None))
    else:
      for pos, k in enumerate(leaf.feature_ids):
        sites[k].append((li, pos))
  return sites


def _resolve_num_ids(num_ids, spec, sites, walk: StaticWalk) -> dict[int, int]:
  """Number of ids to probe per categorical feature."""
  names = spec.names
  cat = [k for k in range(spec.num_features)
         if any(not np.issubdtype(spec.leaves[li].dtype, np.inexact) for li, _ in sites[k])]
  given: dict[str, int] = {}
  if isinstance(num_ids, Mapping):
    unknown = sorted(set(num_ids) - {names[k] for k in cat})
    if unknown:
      raise UnknownNameError(f"`num_ids` names {unknown}, which are not integer (categorical) features. "
                             f"Categorical features: {[names[k] for k in cat]}")
    given = {str(k): int(v) for k, v in num_ids.items()}
  elif num_ids is not None:
    given = {names[k]: int(num_ids) for k in cat}
  out = {}
  for k in cat:
    if names[k] in given:
      n = given[names[k]]
    else:
      leaves = 0
      for li, _ in sites[k]:
        leaves |= 1 << li
      found = [b for t, b in walk.bounds if t & leaves]
      n = min(found) if found else 2
    if any(spec.leaves[li].dtype == np.bool_ for li, _ in sites[k]):
      n = min(n, 2)
    if n < 2:
      raise ValueError(f"Categorical feature {names[k]!r}: need at least 2 ids to compare, got {n}. Pass "
                       f"`num_ids={{{names[k]!r}: n}}` with its number of valid ids.")
    out[k] = n
  return out


class _Run(NamedTuple):
  positive: bool     # |normal| + 0.1 parameters and positive "on" values
  annihilate: bool   # zero the live elements of placing first contacts
  shift: int         # categorical base ids + shift (mod the number of ids)
  label: str


def _schedule(draws: int, annihilate: bool, categorical: bool) -> list[_Run]:
  runs = [_Run(True, True, 0, "annihilating")] if annihilate else []
  for d in range(draws):
    shift = (d + 1) % 2 if categorical else 0
    runs.append(_Run(d == 0, False, shift, f"draw {d}"))
  return runs


# ---------------------------------------------------------------------------
# Step 1: the problem (trace, arguments, categorical ids).


@dataclasses.dataclass(frozen=True)
class _Problem:
  """What one call probes: the traced function, its parameters, inputs, base and features."""

  spec: feats.ResolvedSpec
  traced: Traced
  concrete: list[Any]               # concrete parameter values (None for abstract leaves)
  kept: list[bool]                  # leaves kept at their values in every run (``keep``)
  base: list[np.ndarray]            # the base input, per input leaf
  idef: Any                         # the inputs' treedef
  sites: dict[int, list[tuple[int, int | None]]]
  n_ids: dict[int, int]             # categorical feature -> number of ids
  float_idx: list[int]              # float parameter leaves (differentiated)
  other_idx: list[int]
  in_flags: list[tuple[bool, bool]]  # (parameter-derived, feature-dependent) per jaxpr argument
  layout: C.Layout                   # groups of float leaves, factored leaves, contact-reached leaves

  @property
  def shapes(self) -> list[tuple[int, ...]]:
    return [tuple(l.shape) for l in self.traced.params.leaves]

  @property
  def outputs(self) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    return output_layout(self.traced.out_shape)

  @property
  def out_float(self) -> tuple[bool, ...]:
    leaves = jax.tree_util.tree_leaves(self.traced.out_shape)
    return tuple(bool(jnp.issubdtype(l.dtype, jnp.inexact)) for l in leaves)


def _check_options(draws: int, chunk_size: int | None, memory_budget: int | None) -> None:
  if draws < 1:
    raise ValueError(f"`draws` must be >= 1, got {draws}.")
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
  if memory_budget is not None and memory_budget <= 0:
    raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget}.")


def _check_keep(keep: str | Sequence[str], ppaths: Sequence[str], concrete: Sequence[Any]) -> list[bool]:
  keep = (keep,) if isinstance(keep, str) else tuple(keep)
  unknown = [k for k in keep if k not in ppaths]
  if unknown:
    raise UnknownNameError(f"`keep` names parameter leaves {unknown} that do not exist. "
                           f"Parameter paths: {list(ppaths)}")
  kept = [p in keep for p in ppaths]
  for p, c, k in zip(ppaths, concrete, kept):
    if k and c is None:
      raise TypeError(f"`keep`: parameter leaf {p!r} is a ShapeDtypeStruct; a kept leaf needs a concrete value.")
  return kept


def _setup(fn: Callable, params: Any, inputs: Any, features: Any, base: Any, keep, num_ids) -> _Problem:
  spec = feats.resolve(features, inputs)
  traced = trace(fn, params, inputs)
  ppaths, pleaves, _ = traced.params
  concrete = [None if isinstance(x, jax.ShapeDtypeStruct) else x for x in jax.tree.leaves(params)]
  kept = _check_keep(keep, ppaths, concrete)
  ileaves_src, idef = jax.tree_util.tree_flatten_with_path(inputs)
  ipaths = [feats.keystr(p) for p, _ in ileaves_src]
  base_np = _check_base(base, inputs, ipaths, list(spec.leaves))
  walked = static_walk(traced.closed, len(pleaves), spec)
  sites = _feature_sites(spec)
  n_ids = _resolve_num_ids(num_ids, spec, sites, walked)
  float_idx = [i for i, l in enumerate(pleaves) if jnp.issubdtype(l.dtype, jnp.inexact)]
  other_idx = [i for i in range(len(pleaves)) if i not in float_idx]
  in_flags = [(True, False)] * len(pleaves) + [(False, bool(l.feature_ids)) for l in spec.leaves]
  lay = C.layout(traced.closed, len(pleaves), float_idx, in_flags)
  return _Problem(spec, traced, concrete, kept, base_np, idef, sites, n_ids, float_idx, other_idx, in_flags, lay)


# ---------------------------------------------------------------------------
# Step 2: the columns and their chunks.


class _Columns(NamedTuple):
  columns: list[tuple[int, int | None]]  # (feature, id index or None): one per float feature / probed id
  capped: list[str]                      # categorical features whose ids are sampled
  chunk: int                             # columns per chunk (+ 1 base column per chunk)
  n_chunks: int
  fast: bool                             # compile without optimisation (small problems)


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def _plan_columns(pb: _Problem, n_runs: int, max_ids: int, chunk_size: int | None,
                  memory_budget: int | None) -> _Columns:
  columns: list[tuple[int, int | None]] = []
  capped: list[str] = []
  for k in range(pb.spec.num_features):
    if k in pb.n_ids:
      n = pb.n_ids[k]
      if n > max_ids:
        capped.append(pb.spec.names[k])
      columns.extend((k, j) for j in range(min(n, max_ids)))
    else:
      columns.append((k, None))
  C_ = max(len(columns), 1)
  sizes = [_size(pb.shapes[i]) for i in pb.float_idx]
  n_float = sum(sizes)
  n_in = sum(_size(l.shape) for l in pb.spec.leaves)
  n_out = sum(_size(s) for s in pb.outputs[1].values())
  work = walk.work(pb.traced.closed.jaxpr)
  lay = pb.layout
  # Bytes per column: the gradients (projection: leaves not factored; contact-local: the leaves
  # it reaches), the intermediates kept for the backward pass, the input column and the outputs.
  grads = sum(n for t, n in enumerate(sizes) if t not in lay.factored)
  grads += sum(sizes[t] for t in lay.reached)
  per_column = 4 * (grads + work + n_in + 2 * n_out)
  chunk = C.chunking(C_, chunk_size, memory_budget, per_column)
  n_chunks = -(-C_ // chunk)
  # Small problems: XLA's compile time dominates the run time, so compile without optimisation.
  fast = (n_float + work) * (chunk + 1) * n_chunks * n_runs <= C.FAST_COMPILE_ELEMENTS
  return _Columns(columns, capped, chunk, n_chunks, fast)


def _compiled(fn: Callable, pb: _Problem, fast: bool) -> C.Fns:
  """The compiled functions, from the cache when ``fn`` was probed with the same signature."""
  _, pleaves, pdef = pb.traced.params
  avals = lambda leaves: tuple((tuple(l.shape), np.dtype(l.dtype).str) for l in leaves)
  x64 = bool(getattr(jax.config, "jax_enable_x64", False))
  signature = (pdef, avals(pleaves), pb.idef, avals(pb.spec.leaves), tuple(pb.in_flags), fast, x64,
               C.FACTOR_MIN, C.TILE_BYTES)
  return C.COMPILED.get_or_build(
      fn, (signature,),
      lambda: C.build(pb.traced.closed, len(pleaves), pb.float_idx, pb.in_flags, pb.out_float, fast,
                      pb.layout))


# ---------------------------------------------------------------------------
# Step 3: the runs (a parameter draw and a base each), their chunks and accumulators.


@dataclasses.dataclass
class _Acc:
  """Device accumulators (updated in place, donated, by every chunk) and per-run bookkeeping.

  Float leaves are in groups (:func:`compile.groups`): small ones concatenated,
  large ones alone, in ``float_idx`` order.
  """

  u: list[Any]          # changed output gradients, every run
  a: list[Any]          # changed output gradients, runs where the element is annihilated
  c: list[Any]          # changed contact-local gradients
  nf: list[Any]         # non-finite gradients
  o: list[Any]          # changed outputs, per output leaf
  live_any: np.ndarray
  annihilated: np.ndarray
  zeroed: np.ndarray    # per float leaf: elements zeroed by the annihilating run
  redrawn: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)
  run_lines: list[str] = dataclasses.field(default_factory=list)


def _accumulators(pb: _Problem, W: int) -> _Acc:
  # numpy -> device_put: no compiles
  zeros = lambda shape: jax.device_put(np.zeros(shape + (W,), np.uint32))
  sizes = [_size(pb.shapes[i]) for i in pb.float_idx]
  gsizes = [sum(sizes[t] for t in g) for g in pb.layout.groups]
  u, a, c = ([zeros((n,)) for n in gsizes] for _ in range(3))
  nf = [jax.device_put(np.zeros(n, bool)) for n in gsizes]
  opaths, oshapes = pb.outputs
  n_float = sum(sizes)
  return _Acc(u, a, c, nf, [zeros(oshapes[p]) for p in opaths], np.zeros(n_float, bool),
              np.zeros(n_float, bool), np.zeros(len(pb.float_idx), np.int64))


class _Prepared(NamedTuple):
  """A run ready for its chunks: its parameters, base and what the base function measured."""

  pf: list[Any]                    # float parameters (device)
  info: C.BaseInfo
  on_positive: bool                # positive "on" values
  base: list[np.ndarray]           # the run's base input
  rng: np.random.Generator         # continues into the columns' "on" values
  cseed: np.uint32                 # seed of the contact-local cotangents
  r: list[Any]                     # the output projection
  cols: list[tuple[int, int | None]]  # (feature, id or None) per column


def _site_index(leaf: feats.InputLeaf, pos: int | None, whole: tuple = (Ellipsis,)) -> tuple:
  """The index of a feature's site in its input leaf.

  Position ``pos`` along the feature axis, or ``whole`` for a leaf that is one feature.
  """
  return whole if pos is None else (slice(None),) * cast(int, leaf.axis) + (pos,)


def _shifted_base(pb: _Problem, shift: int) -> list[np.ndarray]:
  """The base with every categorical id shifted by ``shift`` (mod its number of ids)."""
  out = [b.copy() for b in pb.base]
  if shift:
    for k in pb.n_ids:
      for li, pos in pb.sites[k]:
        idx = _site_index(pb.spec.leaves[li], pos)
        out[li][idx] = ((out[li][idx].astype(np.int64) + shift) % pb.n_ids[k]).astype(out[li].dtype)
  return out


def _draw(pb: _Problem, seed, positive: bool, fan_in: bool = False):
  flat = _draw_params(np.random.default_rng(seed), pb.traced.params.leaves, pb.concrete, positive, pb.kept,
                      fan_in=fan_in)
  return flat, [jax.device_put(flat[i]) for i in pb.float_idx]


def _annihilate(pb: _Problem, fns: C.Fns, flat, info: C.BaseInfo, base_args, acc: _Acc):
  """Zeroes the elements that place a nonzero value into a feature-dependent one at the base.

  Lowest rank first (a bias before the kernel of ``b @ w + x @ w``: zeroing b already zeroes
  the placed value, and w keeps multiplying the features), until none is left.
  """
  shapes = pb.shapes
  vals = {i: np.array(flat[i], copy=True) for i in pb.float_idx}
  done = {i: np.zeros(shapes[i], bool) for i in pb.float_idx}
  pf = None
  for _ in range(8):
    placed = {i: np.asarray(z) & ~done[i] & (not pb.kept[i]) for z, i in zip(info.placed, pb.float_idx)}
    ranks = [len(shapes[i]) for i, z in placed.items() if z.any()]
    if not ranks or not bool(info.finite):
      break
    for i, z in placed.items():
      if len(shapes[i]) == min(ranks):
        vals[i][z] = 0
        done[i] |= z
        acc.zeroed[pb.float_idx.index(i)] += int(z.sum())
    pf = [jax.device_put(vals[i]) for i in pb.float_idx]
    info = fns.base(pf, *base_args)
  return pf, info


def _prepare_run(pb: _Problem, fns: C.Fns, run: _Run, seed, cols_plan: _Columns, max_ids: int, po, consts,
                 acc: _Acc, prog: _Progress) -> _Prepared | None:
  """Draws a run's parameters, redraws and annihilates them as needed, and records the run's line.

  Parameters are redrawn positive if the base is non-finite. Returns ``None`` if the
  run is skipped.
  """
  rng = np.random.default_rng(seed[1])
  cseed = np.uint32(rng.integers(0, 2**32))  # of the contact-local cotangents
  opaths, oshapes = pb.outputs
  r = [jax.device_put(rng.standard_normal(oshapes[p]).astype(np.float32)) for p in opaths]
  ids = {k: (np.arange(n) if n <= max_ids else np.sort(rng.choice(n, max_ids, replace=False)))
         for k, n in pb.n_ids.items()}
  cols = [(k, None if j is None else int(ids[k][j])) for k, j in cols_plan.columns]
  positive = on_positive = run.positive or run.annihilate
  base_run = _shifted_base(pb, run.shift)
  base_args = (po, consts, [jax.device_put(b) for b in base_run], r, cseed)
  flat, pf = _draw(pb, seed[0], positive, fan_in=run.annihilate)
  info = fns.base(pf, *base_args)
  if not bool(info.finite) and not positive:
    # Non-finite at the base (e.g. a negative variance): redraw this draw positive.
    acc.redrawn += 1
    positive = True
    flat, pf = _draw(pb, seed[0], True)
    info = fns.base(pf, *base_args)
  line = f"{run.label}: {'positive' if positive else 'normal(0, 1)'} parameters"
  if positive and not on_positive:
    line += " (redrawn: non-finite at the base with normal(0, 1))"
  if run.annihilate and bool(info.finite):
    pf_zeroed, info = _annihilate(pb, fns, flat, info, base_args, acc)
    pf = pf if pf_zeroed is None else pf_zeroed
    line += f", kernels / fan-in, {int(acc.zeroed.sum())} placing elements zeroed"
  if not bool(info.finite):
    if run.annihilate:
      acc.notes.append("the annihilating run was skipped: its base gives non-finite outputs or gradients "
                       "(e.g. a division by a value that vanishes there)")
      acc.run_lines.append(line + " (skipped: non-finite at the base)")
      for _ in range(cols_plan.n_chunks):
        prog.step(run.label)
      return None
    warnings.warn(
        f"gradient_table: {run.label} gives non-finite outputs or gradients at the base even with "
        f"positive parameters; elements with non-finite gradients are not marked in this draw. "
        f"Pass `keep=` for leaves that need their real values (e.g. variances) or a finite `base`.",
        RuntimeWarning, stacklevel=3)
  if run.shift and pb.n_ids:
    line += f", categorical base ids + {run.shift}"
  acc.run_lines.append(line)
  live_np = np.concatenate([np.asarray(l) for l in info.live]) if info.live else np.zeros(0, bool)
  acc.live_any |= live_np
  acc.annihilated |= ~live_np
  return _Prepared(pf, info, on_positive, base_run, rng, cseed, r, cols)


def _columns_input(pb: _Problem, part, rng: np.random.Generator, positive: bool, base_run, chunk: int):
  """The input of one chunk: column 0 the base, column c the base with ``part[c - 1]`` switched on."""
  val = [np.broadcast_to(b, (chunk + 1,) + b.shape).copy() for b in base_run]
  for c, (k, idv) in enumerate(part, start=1):
    for li, pos in pb.sites[k]:
      leaf = pb.spec.leaves[li]
      idx = (c,) + _site_index(leaf, pos, whole=())
      if np.issubdtype(leaf.dtype, np.inexact):
        shape = val[li][idx].shape
        v = rng.uniform(0.5, 1.5, shape)
        if not positive:
          v = v * rng.choice([-1.0, 1.0], shape)
        val[li][idx] = base_run[li][idx[1:]] + v.astype(leaf.dtype)
      else:
        val[li][idx] = np.asarray(idv).astype(leaf.dtype)
  return val


def _placement(part, chunk: int, W: int, K: int):
  """Where the chunk's columns go in the packed masks: first word, word and bit per column, validity."""
  if not part:
    return np.int32(0), np.zeros(chunk, np.int32), np.zeros(chunk, np.uint32), np.zeros(chunk, bool)
  words = np.array([k // M.BITS for k, _ in part] + [0] * (chunk - len(part)), np.int32)
  w0 = int(min(words[0], W - K))
  rel = np.where(np.arange(chunk) < len(part), words - w0, 0).astype(np.int32)
  bit = np.array([k % M.BITS for k, _ in part] + [0] * (chunk - len(part)), np.uint32)
  valid = np.arange(chunk) < len(part)
  return np.int32(w0), rel, bit, valid


def _run_chunks(pb: _Problem, fns: C.Fns, prep: _Prepared, cols_plan: _Columns, po, consts, tols, acc: _Acc,
                pending, prog: _Progress, label: str):
  """Runs every chunk of one run; returns the last chunk's (output to wait on, label).

  Each chunk waits for the previous one, so the next one is queued meanwhile, across runs too.
  """
  W = M.num_words(pb.spec.num_features)
  chunk = cols_plan.chunk
  K = min(W, -(-chunk // M.BITS) + 1)
  info = prep.info
  for c0 in range(0, len(cols_plan.columns) or 1, chunk):
    part = prep.cols[c0:c0 + chunk]
    val = _columns_input(pb, part, prep.rng, prep.on_positive, prep.base, chunk)
    w0, rel, bit, valid = _placement(part, chunk, W, K)
    acc.u, acc.a, acc.c, acc.nf, acc.o, done = fns.chunk(
        prep.pf, po, consts, val, prep.r, prep.cseed, info.live, info.grad_scale, info.contact_scale, *tols,
        w0, rel, bit, valid, acc.u, acc.a, acc.c, acc.nf, acc.o)
    if pending is not None:  # wait for the previous chunk (the next one is queued meanwhile)
      pending[0].block_until_ready()
      prog.step(pending[1])
    pending = (done, label)
  return pending


# ---------------------------------------------------------------------------
# Step 4: the table and its evidence.


def _packed(m: np.ndarray) -> np.ndarray | None:
  return M.compress(m) if m.any() else None


def _assemble(pb: _Problem, acc: _Acc, cols_plan: _Columns, draws: int) -> FeatureTable:
  ppaths = pb.traced.params.paths
  shapes = pb.shapes
  W = M.num_words(pb.spec.num_features)
  packed: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  contact_change: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  live_only: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  live_bits: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  ann_bits: dict[str, np.ndarray | None] = {p: None for p in ppaths}
  join = lambda accs, empty: np.concatenate([np.asarray(a) for a in accs]) if accs else empty
  acc_u, acc_a, acc_c = (join(a, np.zeros((0, W), np.uint32)) for a in (acc.u, acc.a, acc.c))
  acc_nf = join(acc.nf, np.zeros(0, bool))
  nonfinite = {}
  start = 0
  for i in pb.float_idx:
    p, n = ppaths[i], _size(shapes[i])
    part = slice(start, start + n)
    start += n
    u, a = acc_u[part].reshape(shapes[i] + (W,)), acc_a[part].reshape(shapes[i] + (W,))
    ann = acc.annihilated[part].reshape(shapes[i])
    m = np.where(ann[..., None], a, u)
    packed[p] = _packed(m)
    live_only[p] = _packed(u & ~m)
    contact_change[p] = _packed(acc_c[part].reshape(shapes[i] + (W,)))
    live_bits[p] = bits1(acc.live_any[part].reshape(shapes[i]))
    ann_bits[p] = bits1(ann)
    if acc_nf[part].any():
      nonfinite[p] = int(acc_nf[part].sum())
  names = pb.spec.names
  evidence = ProbeEvidence(
      features=tuple(names), shapes=dict(zip(ppaths, shapes)), contact_change=contact_change,
      live=live_bits, annihilated=ann_bits, live_only=live_only, runs=tuple(acc.run_lines),
      num_ids={names[k]: n for k, n in pb.n_ids.items()}, ids_capped=tuple(cols_plan.capped),
      draws=draws, positive_draws=acc.redrawn, nonfinite=nonfinite,
      zeroed={ppaths[i]: int(n) for i, n in zip(pb.float_idx, acc.zeroed) if n}, notes=tuple(acc.notes),
      columns=len(cols_plan.columns), chunk=cols_plan.chunk)
  output_packed = [_packed(np.asarray(o)) for o in acc.o]
  return assemble(pb.spec, pb.traced, packed, output_packed, method="gradient", evidence=evidence)


def gradient_table(fn: Callable, params: Any, inputs: Any, features: Any, *, key=None, base: Any = None,
                   draws: int = 3, annihilate: bool = True, chunk_size: int | None = None,
                   memory_budget: int | None = None, progress: bool | None = None,
                   num_ids: int | Mapping[str, int] | None = None, max_ids: int = 256,
                   keep: Sequence[str] = (), rtol: float = 1e-4, atol: float = 1e-6) -> FeatureTable:
  """Builds the feature→parameter table by gradient mapping (the probe).

  For each *run* (a parameter draw and a base) and each feature ``f``: the
  inputs are set to the base except feature ``f``, which is switched on; a
  random projection of the outputs is differentiated w.r.t. every float
  parameter, and the elements whose gradient differs from the base gradient
  (``|g_on - g_base| > rtol * max(|g_on|, |g_base|) + atol * max|g_base|``,
  the last maximum over the leaf) changed with ``f``.

  Which runs mark an element: the probe also measures, per run, whether the
  element's first contacts are *annihilated* at the base (their contact-local
  gradient is zero; see docs/probe.md). There its gradient can only change
  through a first-contact feature. An element annihilated in some run is
  marked from those runs only; an element live in every run (an added bias,
  an additive mean) from all runs. Changes seen only in live runs are kept as
  evidence (``table.evidence.live_only``) and checked by :func:`cross_check`.

  Runs:

  * ``draws`` generic draws: draw 0 all-positive (``|normal| + 0.1``, positive
    "on" values: no ReLU dead at a zero base), later ones ``normal(0, 1)``
    (redrawn positive when the base gives non-finite values, e.g. a negative
    variance). With categorical features, draws 0, 2, 4... use the base ids
    ``+ 1`` (mod the number of ids), so that every embedding row is not
    gathered at the base in some run.
  * ``annihilate=True`` adds one positive run in which the elements that
    *place* a value into a feature-dependent one and are live at the base
    (biases and means added to features, rows gathered at the base id,
    concatenated tokens...) are zero, so that later normalised inputs and
    gathered embeddings vanish at the base and the kernels reading them single
    out their features. Leaves in ``keep`` are never zeroed.
  * Float features are switched on to ``base + v``, ``v`` random and nonzero
    (``±U(0.5, 1.5)``, positive in positive runs), per element (every replica
    position: batch, time, unit slots...) and per run.
  * Integer (categorical) features are compared at every id ``0 .. n-1``
    against the base id. ``n`` is ``num_ids`` or inferred from the jaxpr: the
    smallest table size of a ``gather``/``dynamic_slice`` indexed by the
    feature, or the size of an ``iota`` it is compared with (``one_hot``); 2
    when nothing bounds it; 2 for ``bool``. At most ``max_ids`` ids per run
    (a random sample when ``n`` is larger).
  * Integer parameter leaves keep their concrete values (zeros for abstract
    leaves) and are never marked.
  * Output masks are filled by forward differences from all runs: an output
    element depends on ``f`` if it changes when ``f`` is switched on.

  Columns (features and ids) are vmapped in chunks sized from
  ``memory_budget``; the compiled functions are cached across calls (per
  function object and abstract signature, weakly held, at most 8).

  Args:
    fn: a pure function ``fn(params, inputs) -> outputs``.
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes and
      dtypes of float leaves are used; values are drawn).
    inputs: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    features: a feature spec matching ``inputs`` (see :func:`dependency_table`).
    key: a ``jax.random.key``; required.
    base: a concrete pytree like ``inputs``; defaults to zeros.
    draws: number of generic parameter draws (union of patterns).
    annihilate: add the annihilating run (see above).
    chunk_size: columns vmapped together; default: from ``memory_budget``.
    memory_budget: bytes the columns of one chunk may use (estimated from the
      parameter, input, output and intermediate sizes of ``fn``); default 1 GiB.
    progress: show a tqdm progress bar over the chunks on stderr; ``None``
      (default) shows it only when stderr is a terminal (tqdm's convention).
    num_ids: number of valid ids of the categorical features (an int for all
      of them, or ``{feature name: n}``); inferred when omitted.
    max_ids: at most this many ids of one categorical feature per run.
    keep: parameter leaf paths kept at their given (concrete) values in every
      run instead of being drawn, e.g. normalisation statistics, so that a
      ``base`` at the running mean makes the normalised inputs vanish.
    rtol: relative tolerance of a gradient change.
    atol: absolute tolerance, relative to the leaf's largest base gradient.

  Returns:
    A :class:`FeatureTable` with ``method="gradient"`` and ``evidence`` (a
    :class:`ProbeEvidence`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> params = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
    >>> x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    >>> probe = js.gradient_table(fn, params, x, js.Features(["a", "b", "c"]),
    ...                           key=jax.random.key(0))
    >>> bool(probe.lookup("b")["w"][1].all()), bool(probe.lookup("b")["w"][0].any())
    (True, False)
  """
  key = _as_key(key)
  _check_options(draws, chunk_size, memory_budget)
  pb = _setup(fn, params, inputs, features, base, keep, num_ids)
  runs = _schedule(draws, annihilate, bool(pb.n_ids))
  cols_plan = _plan_columns(pb, len(runs), max_ids, chunk_size, memory_budget)
  fns = _compiled(fn, pb, cols_plan.fast)
  consts = list(pb.traced.closed.consts)
  shapes, pleaves = pb.shapes, pb.traced.params.leaves
  po = [jax.device_put(np.asarray(pb.concrete[i]) if pb.concrete[i] is not None
                       else np.zeros(shapes[i], pleaves[i].dtype)) for i in pb.other_idx]
  acc = _accumulators(pb, M.num_words(pb.spec.num_features))
  prog = _Progress(len(runs) * cols_plan.n_chunks, progress,
                   f"{len(cols_plan.columns)} columns x {len(runs)} runs")
  tols = (np.float32(rtol), np.float32(atol))
  pending = None
  for run, seed in zip(runs, _np_rng(key).integers(0, 2**63, size=(len(runs), 2))):
    prep = _prepare_run(pb, fns, run, seed, cols_plan, max_ids, po, consts, acc, prog)
    if prep is None:
      continue
    label = f"{run.label} ({len(acc.run_lines)}/{len(runs)})"
    pending = _run_chunks(pb, fns, prep, cols_plan, po, consts, tols, acc, pending, prog, label)
  if pending is not None:
    pending[0].block_until_ready()
    prog.step(pending[1])
  prog.close()
  return _assemble(pb, acc, cols_plan, draws)
