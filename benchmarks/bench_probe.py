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
densely, params x features bools per array).
"""

from __future__ import annotations

import inspect
import resource
import time

import common
import jax
import models

import jaxsurgery as js

WIDTHS = [256, 1024]
BUDGET = 120.0


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
    check = js.cross_check(boolean(), result)
    row = {"model": m.name, "num_params": m.num_params, "num_features": len(result.features),
           "probe_s": probe_s, "probe_first_s": first, "probe_second_s": second,
           "probe_cpu_first_s": cpu_first, "probe_cpu_second_s": cpu_second,
           "probe_compile_s": compile_s, "probe_3runs_s": three, "probe_cpu_3runs_s": cpu_three,
           "runs": len(ev.runs) if ev is not None else None,
           "columns": getattr(ev, "columns", None), "chunk": getattr(ev, "chunk", None),
           "probe_rss_mb": probe_rss, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "table_s": t_table, "ratio": probe_s / t_table, "cross_check_ok": bool(check.ok),
           "live_only": sum(a.live_only for a in check.per_leaf.values()), **defaults}
    rows.append(row)
    f = common.fmt_s
    print(f"{m.name:16s} {m.num_params:>12,d} params, {row['num_features']} features, "
          f"{row['columns']} columns x {row['runs']} runs, chunk {row['chunk']}: gradient probe "
          f"{f(probe_s)} (cpu {f(cpu_second or cpu_first)}); first call {f(first)} (cpu "
          f"{f(cpu_first)}, XLA compile {f(compile_s)}); 3 runs (annihilate=False) {f(three)} "
          f"(cpu {f(cpu_three)}); boolean table {f(t_table)} -> probe is {row['ratio']:,.0f}x "
          f"slower; cross_check ok: {row['cross_check_ok']}; peak RSS {row['probe_rss_mb']:,.0f} MB "
          f"({row['max_rss_mb']:,.0f} MB with the cross-check)")
    if first > BUDGET:
      print(f"stopping: probe took > {BUDGET:.0f} s")
      break
  common.save("probe", rows)


if __name__ == "__main__":
  main()
