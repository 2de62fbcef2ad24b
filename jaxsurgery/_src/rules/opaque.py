"""Opaque primitives: random number generation, linear algebra, FFT, unknown ones.

Structure:
* dense (unknown primitives, stateful RNG, collectives that mix shards, equinox's
  ``unvmap_*`` reductions to a scalar): every
  output element may depend on every input element. Every parameter operand is
  touched by everything that enters the op. Sound, never precise.
* leading (random_bits, random_split): ``out[b, t]`` is a function of
  ``key[b]``: the key's axes lead the output, the new trailing axes replicate.
* representation (random_wrap/unwrap, to_edtype/from_edtype): a typed key
  ``key[b]`` is made of ``data[b, :]``: OR over / broadcast along the trailing
  representation axes. Masks follow the aval's rank, so ``key<fry>[3]`` has a
  rank-1 mask while its raw ``uint32[3, 2]`` data has a rank-2 one.
  (Elementwise key ops -- random_seed, random_fold_in, threefry2x32 -- are in
  ``elementwise``.)
* blockwise (linalg, FFT): the op acts independently on each batch index of the
  leading axes and densely within the trailing core axes (two for matrices, the
  transformed axes for FFT). Using fewer batch axes than the op really has is
  only less precise, never unsound, so ops with mixed core ranks (eigh's
  eigenvalues, svd's singular values) use the smallest rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxsurgery._src.core import masks as M
from jaxsurgery._src.core.errors import UnknownPrimitiveError
from jaxsurgery._src.core.values import Val, out_val
from jaxsurgery._src.rules.common import all_words, cut_pull
from jaxsurgery._src.rules.registry import add_traits, register

if TYPE_CHECKING:  # the interpreter imports the rules
  from jaxsurgery._src.compat import Eqn
  from jaxsurgery._src.core.interpreter import Context


def dense(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Every output element depends on every input element: the conservative rule, always sound.

  Every parameter-derived operand is touched by everything that enters the
  op. Primitives without a rule get it, with an ``UnknownPrimitiveWarning``.

  Args:
    ctx: the interpreter's state.
    eqn: the eqn.
    invals: the operands' values.

  Returns:
    One value per output, each with the OR of every operand's mask on every element.

  Example:
    >>> import jax, jax.numpy as jnp, jaxsurgery as js
    >>> fn = lambda p, x: jnp.cumsum(x * p["w"])
    >>> params, x, spec = {"w": jnp.ones(3)}, jnp.ones(3), js.Features(["a", "b", "c"])
    >>> js.dependency_table(fn, params, x, spec).output_mask()[0].tolist()    # cumsum's own rule
    [True, False, False]
    >>> with js.override_rule("cumsum", js.rules.dense):
    ...   js.dependency_table(fn, params, x, spec).output_mask()[0].tolist()
    [True, True, True]
  """
  words = all_words(invals)
  for v in invals:
    ctx.touch(v, M.uniform(words, v.ndim))
  outs = []
  for o in eqn.outvars:
    mask = M.uniform(words, len(o.aval.shape))
    pull = cut_pull([(v, lambda t, n=v.ndim: M.uniform(M.reduce_all(t), n)) for v in invals], mask)
    outs.append(out_val(o, mask, pull))
  return outs


def blockwise(core_rank):
  """A rule for ops that are dense within ``core_rank(eqn)`` trailing axes, batched elsewhere."""

  def rule(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
    """``out[b, ...] = op(in[b, ...])``: exact on the leading batch axes, dense on the core."""
    core = core_rank(eqn)
    ranks = [v.ndim for v in invals] + [len(o.aval.shape) for o in eqn.outvars]
    nb = max(0, min(ranks) - core)
    shapes = [v.shape[:nb] for v in invals] + [tuple(o.aval.shape[:nb]) for o in eqn.outvars]
    if any(s != shapes[0] for s in shapes):
      return dense(ctx, eqn, invals)

    def batch_part(m, rank):
      m = M.reduce_or(M.lift(m, rank), range(nb, rank), keepdims=True)
      return None if m is None else m.reshape(m.shape[:nb] + m.shape[-1:])

    batch = M.orr(*(batch_part(v.mask, v.ndim) for v in invals))
    spread = lambda m, rank: None if m is None else m.reshape(m.shape[:nb] + (1,) * (rank - nb) + m.shape[-1:])
    for v in invals:
      ctx.touch(v, spread(batch, v.ndim))
    outs = []
    for o in eqn.outvars:
      rank = len(o.aval.shape)
      mask = spread(batch, rank)
      pull = cut_pull([(v, lambda t, r=rank, n=v.ndim: spread(batch_part(t, r), n)) for v in invals], mask)
      outs.append(out_val(o, mask, pull))
    return outs
  return rule


def leading(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """``out[b, t] = op(x[b])`` for the leading axes ``b`` of the first operand (random_bits, split).

  Every other operand is dense (it reaches every output element).
  """
  x, rest = invals[0], invals[1:]
  words = all_words(rest)
  for v in rest:
    ctx.touch(v, M.uniform(M.reduce_all(x.mask), v.ndim))
  ctx.touch(x, M.uniform(words, x.ndim))
  outs = []
  for o in eqn.outvars:
    rank = len(o.aval.shape)
    extra = rank - x.ndim
    m = None if x.mask is None else M.lift(x.mask, x.ndim).reshape(
        M.lift(x.mask, x.ndim).shape[:-1] + (1,) * extra + x.mask.shape[-1:])
    mask = M.orr(m, M.uniform(words, rank))
    pull = cut_pull([(x, lambda t, e=extra, r=rank: M.reduce_or(M.lift(t, r), range(r - e, r)))]
                    + [(v, lambda t, n=v.ndim: M.uniform(M.reduce_all(t), n)) for v in rest], mask)
    outs.append(out_val(o, mask, pull))
  return outs


def representation(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Conversions between an extended dtype and its representation.

  random_wrap/unwrap, to_edtype/from_edtype: ``key[b]`` is made of ``data[b, :]``
  (dense over the trailing axes).
  """
  x = invals[0]
  o = eqn.outvars[0]
  rank = len(o.aval.shape)
  if rank == x.ndim:
    return [out_val(o, x.mask, x.pull)]
  if rank < x.ndim:  # wrap: OR over the trailing representation axes
    trail = list(range(rank, x.ndim))
    fwd = lambda m: M.reduce_or(M.lift(m, x.ndim), trail)
    bwd = lambda t: M.lift(t, rank).reshape(M.lift(t, rank).shape[:-1] + (1,) * len(trail) + t.shape[-1:])
  else:  # unwrap: every representation element of key[b] depends on key[b]
    extra = rank - x.ndim
    fwd = lambda m: M.lift(m, x.ndim).reshape(M.lift(m, x.ndim).shape[:-1] + (1,) * extra + m.shape[-1:])
    bwd = lambda t: M.reduce_or(M.lift(t, rank), range(x.ndim, rank))
  mask = None if x.mask is None else fwd(x.mask)
  pull = None
  if x.pull is not None:
    pull = lambda t: x.pull(bwd(t))
  return [out_val(o, mask, pull)]


RANDOM = ("rng_bit_generator", "rng_uniform", "random_key_data", "prng_seed", "prng_random_bits",
          "prng_split", "prng_join")
LINALG = ("cholesky", "cholesky_update", "eig", "eigh", "eigh_jacobi", "hessenberg", "householder_product",
          "lu", "lu_pivots_to_permutation", "qr", "schur", "svd", "triangular_solve",
          "tridiagonal", "tridiagonal_solve", "geqrf", "geqp3", "orgqr", "tsqr", "ormqr",
          "symmetric_product")
COLLECTIVES_DENSE = ("all_gather", "all_to_all", "psum_scatter", "reduce_scatter", "axis_index",
                     "pgather", "ragged_all_to_all", "all_gather_invariant")
CONSERVATIVE = ("select_and_gather_add", "select_and_scatter_add", "select_and_scatter",
                "ragged_dot", "ragged_dot_general", "approx_top_k", "custom_linear_solve",
                "linear_solve", "platform_index", "pure_callback", "io_callback", "debug_callback",
                "callback", "ffi_call", "dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                "scaled_dot", "scaled_matmul", "scaled_matmul_wrapper", "custom_partitioning",
                "cudnn_fusion", "custom_fusion", "pallas_call", "unreachable")

register(RANDOM, dense)
register(("unvmap_any", "unvmap_all", "unvmap_max"), dense)   # equinox.internal: one value from every element
register(("random_bits", "random_split"), leading)
register(("random_wrap", "random_unwrap", "to_edtype", "from_edtype"), representation)
register(LINALG, blockwise(lambda eqn: 2))
register("fft", blockwise(lambda eqn: len(eqn.params["fft_lengths"])))


def unsupported_ref(ctx: Context, eqn: Eqn, invals: list[Val]) -> list[Val]:
  """Mutable array references are updated in place; a per-variable analysis would be unsound."""
  raise UnknownPrimitiveError(
      f"jaxsurgery does not support mutable array references (primitive {eqn.primitive.name!r}, "
      f"from jax.new_ref / jax.ref / run_state): they are updated in place, which the mask analysis "
      f"cannot follow soundly. Read the values out of the refs before calling the model function.")


REFS = ("new_ref", "empty_ref", "free_ref", "freeze", "get", "swap", "addupdate", "run_state",
        "accum_grad_in_ref", "broadcast_to", "masked_load", "masked_swap", "create_linear")

register(REFS, unsupported_ref)
register(COLLECTIVES_DENSE, dense)
register(CONSERVATIVE, dense)

# What the probe needs beyond the mask rule (see registry.TRAITS).
add_traits(("random_bits", "random_wrap", "random_unwrap", "rng_bit_generator"), "zero_grad")
