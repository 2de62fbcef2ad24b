"""Opaque primitives: random number generation, linear algebra, FFT, unknown ones.

Structure:
* dense (unknown primitives, random bits, collectives that mix shards): every
  output element may depend on every input element. Every parameter operand is
  touched by everything that enters the op. Sound, never precise.
* blockwise (linalg, FFT): the op acts independently on each batch index of the
  leading axes and densely within the trailing core axes (two for matrices, the
  transformed axes for FFT). Using fewer batch axes than the op really has is
  only less precise, never unsound, so ops with mixed core ranks (eigh's
  eigenvalues, svd's singular values) use the smallest rank.
"""

from __future__ import annotations

import numpy as np

from jaxsurgery._src import masks as M
from jaxsurgery._src.rules.common import all_words, cut_pull, out_val
from jaxsurgery._src.rules.registry import register, set_dense


def dense(ctx, eqn, invals):
  """Every output element depends on every input element."""
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

  def rule(ctx, eqn, invals):
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


RANDOM = ("random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split",
          "random_fold_in", "random_clone", "threefry2x32", "random_key_data", "rng_bit_generator",
          "rng_uniform", "random_gamma", "threefry4x32", "philox2x32", "philox4x32", "prng_seed",
          "prng_random_bits", "prng_split", "prng_join")
LINALG = ("cholesky", "cholesky_update", "eig", "eigh", "eigh_jacobi", "hessenberg", "householder_product",
          "lu", "lu_pivots_to_permutation", "qr", "schur", "svd", "triangular_solve",
          "tridiagonal", "tridiagonal_solve", "geqrf", "geqp3", "orgqr", "tsqr", "ormqr",
          "symmetric_product")
COLLECTIVES_DENSE = ("all_gather", "all_to_all", "psum_scatter", "reduce_scatter", "axis_index",
                     "pgather", "ragged_all_to_all")
CONSERVATIVE = ("select_and_gather_add", "select_and_scatter_add", "select_and_scatter",
                "ragged_dot", "ragged_dot_general", "approx_top_k", "custom_linear_solve",
                "linear_solve", "platform_index", "pure_callback", "io_callback", "debug_callback",
                "callback", "ffi_call", "dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                "scaled_dot", "scaled_matmul", "scaled_matmul_wrapper", "custom_partitioning",
                "cudnn_fusion", "custom_fusion", "pallas_call")

register(RANDOM, blockwise(lambda eqn: 99))
register(LINALG, blockwise(lambda eqn: 2))
register("fft", blockwise(lambda eqn: len(eqn.params["fft_lengths"])))
register(COLLECTIVES_DENSE, dense)
register(CONSERVATIVE, dense)
set_dense(dense)
