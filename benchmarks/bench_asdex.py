"""2. First-order dependency detection against asdex.jacobian_sparsity.

One named feature per element of a flat input vector; jaxsurgery's answer is
``table.output_mask()`` (outputs x features), asdex's is the (m, n) Jacobian
sparsity pattern w.r.t. the input (params are a non-differentiated argument, so
asdex sees no parameter values). Both get the same concrete arrays.

Both tools trace ``fn`` to a jaxpr and interpret it, so a comparison must say
which traces are reused. Three regimes, identical for both tools:

* ``first``: the first call in a fresh Python process (after the imports), one
  process per (model, tool), median of 3 processes. JAX's one-time work (the
  first trace of every jnp function the model uses, ...) is included.
* ``retrace``: a warm process and a *new function object* per call, so every
  call traces ``fn`` again and no trace cache (JAX's or jaxsurgery's) can hit.
* ``repeat``: a warm process and the *same function object* every call.
  jaxsurgery reuses its cached trace and only interprets again; asdex has no
  cache of its own, but its ``jax.make_jaxpr`` / ``jax.eval_shape`` calls hit
  JAX's trace cache for the same function object.

``trace_s`` is jaxsurgery's own (uncached) trace of a new function object: the
part of a ``retrace`` call that is not interpretation, and so the ``ceiling``
(asdex / trace) any interpreter speed-up could reach in that regime.

  python benchmarks/bench_asdex.py                  # all measurements
  python benchmarks/bench_asdex.py --first M TOOL   # internal: one first call
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import common

BUILDERS = ["mlp", "convnet", "local_mlp", "set_encoder"]
FIRST_REPEATS = 3
N_OURS = 21                  # timed jaxsurgery calls per regime (after one warm-up call)
ASDEX_BUDGET_S = 3.0         # timed asdex calls per regime: as many as fit, 3 to 15
ASDEX_MIN, ASDEX_MAX = 3, 15


def bench_asdex(f) -> dict:
  """common.bench with as many runs as fit ASDEX_BUDGET_S (a 3-run median of a 25 ms call is noise)."""
  first, _ = common.timed(f)  # the warm-up call
  n = max(ASDEX_MIN, min(ASDEX_MAX, int(ASDEX_BUDGET_S / max(first, 1e-6))))
  runs = [common.timed(f)[0] for _ in range(n)]
  return {"first": first, "median": statistics.median(runs), "runs": runs}


def _setup(builder: str):
  import models
  m = getattr(models, builder)()
  return m, models.concrete(m.params), models.concrete(m.inputs)


def _ours(m, P, X, f):
  import jaxsurgery as js
  return js.dependency_table(f, P, X, m.features)


def _theirs(m, P, X, f):
  import asdex
  return asdex.jacobian_sparsity(f, P, X, argnums=1)


def first_call(builder: str, tool: str) -> dict:
  """Seconds of the first call in this (fresh) process; both tools' modules are imported first.

  For jaxsurgery, the part spent in its trace step is timed too (by wrapping
  ``table.trace`` here, in the benchmark).
  """
  import asdex  # noqa: F401  (import cost is not part of the call)
  import jax

  import jaxsurgery  # noqa: F401
  from jaxsurgery._src.core import table as jtable
  m, P, X = _setup(builder)
  jax.block_until_ready((P, X))
  spent = []
  inner = jtable.trace

  def timed_trace(*a, **k):
    t = time.perf_counter()
    out = inner(*a, **k)
    spent.append(time.perf_counter() - t)
    return out
  jtable.trace = timed_trace
  run = _ours if tool == "jaxsurgery" else _theirs
  t = time.perf_counter()
  run(m, P, X, lambda p, x: m.fn(p, x))
  return {"seconds": time.perf_counter() - t, "trace": sum(spent) if spent else None}


def run_first(builder: str, tool: str) -> list[dict]:
  out = []
  for _ in range(FIRST_REPEATS):
    p = subprocess.run([sys.executable, __file__, "--first", builder, tool], capture_output=True,
                       text=True, check=True)
    out.append(json.loads(p.stdout.strip().splitlines()[-1]))
  return sorted(out, key=lambda r: r["seconds"])


def main():
  import jax
  import numpy as np

  from jaxsurgery._src.core import table as jtable

  rows = []
  for builder in BUILDERS:
    m, P, X = _setup(builder)
    fresh = lambda: (lambda p, x: m.fn(p, x))   # a new function object per call
    same = fresh()                              # one function object for every call
    r = {}
    r["ours"] = common.bench(lambda: _ours(m, P, X, fresh()), n=N_OURS)
    r["asdex"] = bench_asdex(lambda: _theirs(m, P, X, fresh()))
    r["ours_same"] = common.bench(lambda: _ours(m, P, X, same), n=N_OURS)
    r["asdex_same"] = bench_asdex(lambda: _theirs(m, P, X, same))
    r["trace"] = common.bench(lambda: jtable.trace(fresh(), P, X), n=N_OURS)
    r["make_jaxpr"] = common.bench(lambda: jax.make_jaxpr(fresh())(P, X), n=N_OURS)
    first_ours, first_asdex = run_first(builder, "jaxsurgery"), run_first(builder, "asdex")
    a = _ours(m, P, X, fresh()).output_mask()
    a_same = _ours(m, P, X, same).output_mask()
    b = np.asarray(_theirs(m, P, X, fresh()).todense()).astype(bool)
    med = lambda k: r[k]["median"]
    row = {"model": m.name, "n_in": int(X.size), "n_out": int(a.shape[0]),
           # retrace: a new function object per call (every call traces)
           "ours_s": med("ours"), "asdex_s": med("asdex"), "ratio": med("asdex") / med("ours"),
           # repeat: the same function object (jaxsurgery's trace cache; JAX's for asdex)
           "ours_same_s": med("ours_same"), "asdex_same_s": med("asdex_same"),
           "ratio_same": med("asdex_same") / med("ours_same"),
           # first call in a fresh process, median of FIRST_REPEATS processes
           "ours_first_s": first_ours[len(first_ours) // 2]["seconds"],
           "ours_first_trace_s": first_ours[len(first_ours) // 2]["trace"],
           "asdex_first_s": first_asdex[len(first_asdex) // 2]["seconds"],
           "ours_first_runs": first_ours, "asdex_first_runs": [r["seconds"] for r in first_asdex],
           "trace_s": med("trace"), "make_jaxpr_s": med("make_jaxpr"),
           "ceiling": med("asdex") / med("trace"),
           "equal": bool(a.shape == b.shape and (a == b).all()),
           "equal_same": bool(a_same.shape == b.shape and (a_same == b).all()),
           "nnz": int(b.sum()), "nnz_ours": int(a.sum()),
           "runs": {k: v["runs"] for k, v in r.items()}}
    row["ratio_first"] = row["asdex_first_s"] / row["ours_first_s"]
    row["ceiling_first"] = row["asdex_first_s"] / row["ours_first_trace_s"]
    rows.append(row)
    f = common.fmt_s
    print(f"{m.name:20s} J {row['n_out']}x{row['n_in']:<5d} nnz {row['nnz']:>8d}  equal {row['equal']}/"
          f"{row['equal_same']}\n"
          f"  retrace (new fn per call): jaxsurgery {f(row['ours_s']):>9s}  asdex {f(row['asdex_s']):>9s}"
          f"  ratio {row['ratio']:5.0f}x  (jaxsurgery trace {f(row['trace_s'])}, make_jaxpr "
          f"{f(row['make_jaxpr_s'])}, ceiling {row['ceiling']:.0f}x)\n"
          f"  repeat (same fn):          jaxsurgery {f(row['ours_same_s']):>9s}  asdex "
          f"{f(row['asdex_same_s']):>9s}  ratio {row['ratio_same']:5.0f}x\n"
          f"  first call (fresh process): jaxsurgery {f(row['ours_first_s']):>9s}  asdex "
          f"{f(row['asdex_first_s']):>9s}  ratio {row['ratio_first']:5.0f}x  (jaxsurgery trace "
          f"{f(row['ours_first_trace_s'])}, ceiling {row['ceiling_first']:.0f}x)", flush=True)
  common.save("asdex", rows)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--first":
    print(json.dumps(first_call(sys.argv[2], sys.argv[3])))
  else:
    main()
