"""3. Gradient probe (jaxsurgery.gradient_table) against the boolean table, same features.

Five-style models (the same 69 features as the 150M model, 189 units, 16 steps) with
vocabularies cut to 16 unit / item types: the probe compares every categorical id, so
the default 512 + 256 ids would give 579 probe columns instead of 99. Default
gradient_table settings otherwise (draws=3 generic draws + the annihilating run,
chunk size from the 1 GiB memory budget).

Per model: the first call (traces and compiles), a second call (the compiled functions
are cached per function object), and a second call with ``annihilate=False`` (the
three runs of the previous probe, like for like). Wall and process CPU time: on a
shared machine the wall time moves with the load, the CPU time much less. A size is
skipped once a call takes longer than BUDGET seconds. Peak RSS is the process's (monotone:
the larger model comes last), before and after the cross-check (which expands the masks
densely, params x features bools per array). The cross-check's own peak is measured with
tracemalloc (numpy's allocations), with the default ``memory_budget`` (1 GiB) and with 256 MiB.

The floor: a plain ``jax.vmap(jax.grad)`` of the model's summed outputs over one chunk of inputs
(the probe needs one gradient per column), times chunks per run, times runs.
"""

from __future__ import annotations

import inspect
import resource
import time
import tracemalloc

import common
import jax
import jax.numpy as jnp
import models

import jaxsurgery as js

WIDTHS = [256, 1024]
BUDGET = 120.0
SMALL_BUDGET = 256 << 20


def traced_peak(f):
  """(result, peak bytes numpy and Python allocated during ``f``), by tracemalloc."""
  tracemalloc.start()
  try:
    out = f()
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def gradient_floor(m, P, X, chunk: int) -> float:
  """Seconds of a plain ``jax.vmap(jax.grad)`` of the model over ``chunk + 1`` inputs (compiled):
  the least one chunk of probe columns can cost, one gradient per column."""
  def loss(p, x):
    outs = [o for o in jax.tree.leaves(m.fn(p, x)) if jnp.issubdtype(o.dtype, jnp.inexact)]
    return sum(jnp.sum(o.astype(jnp.float32)) for o in outs)
  xs = jax.tree.map(lambda x: jnp.broadcast_to(x, (chunk + 1,) + x.shape), X)
  g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
  jax.block_until_ready(g(P, xs))
  return common.bench(lambda: jax.block_until_ready(g(P, xs)), n=3)["median"]


def timed_cpu(f):
  """(wall seconds, process CPU seconds, backend compile seconds, result) of one call."""
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(secs) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    c = time.process_time()
    wall, out = common.timed(f)
    return wall, time.process_time() - c, sum(compiles), out
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def main():
  rows = []
  sig = inspect.signature(js.gradient_table).parameters
  defaults = {k: sig[k].default for k in ("draws", "chunk_size", "annihilate", "memory_budget") if k in sig}
  for width in WIDTHS:
    m = models.five(models.FiveConfig(lstm=width, unit_types=16, item_types=16))
    P, X = models.concrete(m.params), models.concrete(m.inputs)
    probe = lambda **kw: js.gradient_table(m.fn, P, X, m.features, key=jax.random.key(0),
                                           progress=False, **kw)
    try:
      first, cpu_first, compile_s, result = timed_cpu(probe)
    except NotImplementedError:
      print("skipped: not implemented")
      common.save("probe", {"skipped": "NotImplementedError"})
      return
    second = cpu_second = three = cpu_three = None
    if first < BUDGET:
      second, cpu_second, _, _ = timed_cpu(probe)
      three, cpu_three, _, _ = timed_cpu(lambda: probe(annihilate=False))
    probe_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the cross-check
    boolean = lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features)
    t_table = common.bench(boolean, n=7)["median"]
    probe_s = first if second is None else second
    ev = result.evidence
    table = boolean()
    check, cc_peak = traced_peak(lambda: js.cross_check(table, result))
    _, cc_peak_small = traced_peak(lambda: js.cross_check(table, result, memory_budget=SMALL_BUDGET))
    floor = gradient_floor(m, P, X, ev.chunk if ev is not None else 25)
    row = {"model": m.name, "num_params": m.num_params, "num_features": len(result.features),
           "probe_s": probe_s, "probe_first_s": first, "probe_second_s": second,
           "probe_cpu_first_s": cpu_first, "probe_cpu_second_s": cpu_second,
           "probe_compile_s": compile_s, "probe_3runs_s": three, "probe_cpu_3runs_s": cpu_three,
           "runs": len(ev.runs) if ev is not None else None,
           "columns": getattr(ev, "columns", None), "chunk": getattr(ev, "chunk", None),
           "probe_rss_mb": probe_rss, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "table_s": t_table, "ratio": probe_s / t_table, "cross_check_ok": bool(check.ok),
           "live_only": sum(a.live_only for a in check.per_leaf.values()),
           "cross_check_peak_mb": cc_peak / 2**20, "cross_check_peak_mb_small_budget": cc_peak_small / 2**20,
           "cross_check_small_budget": SMALL_BUDGET,
           "plain_vmapped_grad_chunk_s": floor,
           "plain_grads_floor_s": floor * -(-(ev.columns if ev is not None else 0) // max(ev.chunk, 1))
                                  * len(ev.runs) if ev is not None else None, **defaults}
    rows.append(row)
    f = common.fmt_s
    print(f"{m.name:16s} {m.num_params:>12,d} params, {row['num_features']} features, "
          f"{row['columns']} columns x {row['runs']} runs, chunk {row['chunk']}: gradient probe "
          f"{f(probe_s)} (cpu {f(cpu_second or cpu_first)}); first call {f(first)} (cpu "
          f"{f(cpu_first)}, XLA compile {f(compile_s)}); 3 runs (annihilate=False) {f(three)} "
          f"(cpu {f(cpu_three)}); boolean table {f(t_table)} -> probe is {row['ratio']:,.0f}x "
          f"slower; cross_check ok: {row['cross_check_ok']}; peak RSS {row['probe_rss_mb']:,.0f} MB "
          f"({row['max_rss_mb']:,.0f} MB with the cross-check); cross_check peak (tracemalloc) "
          f"{row['cross_check_peak_mb']:,.0f} MB, {row['cross_check_peak_mb_small_budget']:,.0f} MB with "
          f"memory_budget={SMALL_BUDGET >> 20} MiB; plain vmapped jax.grad of one chunk of columns "
          f"{f(floor)}, so >= {f(row['plain_grads_floor_s'])} of plain gradients for all columns and runs")
    if first > BUDGET:
      print(f"stopping: probe took > {BUDGET:.0f} s")
      break
  common.save("probe", rows)


if __name__ == "__main__":
  main()
