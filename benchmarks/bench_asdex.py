"""2. First-order dependency detection against asdex.jacobian_sparsity.

One named feature per element of a flat input vector; jaxsurgery's answer is
``table.output_mask()`` (outputs x features), asdex's is the (m, n) Jacobian
sparsity pattern w.r.t. the input (params are a non-differentiated argument, so
asdex sees no parameter values). Both get the same concrete arrays and a fresh
function object per call (no jax trace-cache hits for either).
"""

from __future__ import annotations

import asdex
import jax
import numpy as np

import common
import jaxsurgery as js
import models

MODELS = [models.mlp(), models.convnet(), models.local_mlp(), models.set_encoder()]


def main():
  rows = []
  for m in MODELS:
    P, X = models.concrete(m.params), models.concrete(m.inputs)
    ours = lambda: js.dependency_table(lambda p, x: m.fn(p, x), P, X, m.features)
    theirs = lambda: asdex.jacobian_sparsity(lambda p, x: m.fn(p, x), P, X, argnums=1)
    t_ours = common.bench(ours, n=7)
    t_theirs = common.bench(theirs, n=3)
    t_trace = common.bench(lambda: jax.make_jaxpr(lambda p, x: m.fn(p, x))(P, X), n=7)
    a = ours().output_mask()
    b = np.asarray(theirs().todense()).astype(bool)
    row = {"model": m.name, "n_in": int(X.size), "n_out": int(a.shape[0]),
           "ours_s": t_ours["median"], "ours_first_s": t_ours["first"],
           "asdex_s": t_theirs["median"], "asdex_first_s": t_theirs["first"],
           "trace_s": t_trace["median"], "ratio": t_theirs["median"] / t_ours["median"],
           # both run make_jaxpr once (asdex also eval_shape); ratio of the rest:
           "ratio_excl_trace": (t_theirs["median"] - t_trace["median"])
                               / max(t_ours["median"] - t_trace["median"], 1e-9),
           "equal": bool(a.shape == b.shape and (a == b).all()), "nnz": int(b.sum()),
           "nnz_ours": int(a.sum())}
    rows.append(row)
    print(f"{m.name:22s} J {row['n_out']}x{row['n_in']:<5d} nnz {row['nnz']:>8d}  "
          f"jaxsurgery {common.fmt_s(row['ours_s']):>9s}  asdex {common.fmt_s(row['asdex_s']):>9s}  "
          f"(make_jaxpr {common.fmt_s(row['trace_s'])})  ratio {row['ratio']:5.0f}x "
          f"({row['ratio_excl_trace']:.0f}x without make_jaxpr)  equal patterns: {row['equal']}")
  common.save("asdex", rows)


if __name__ == "__main__":
  main()
