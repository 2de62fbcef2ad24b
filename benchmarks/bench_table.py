"""1. Table time and peak memory at OpenAI-Five scale (abstract shapes, nothing allocated).

  python benchmarks/bench_table.py            # all measurements (spawns fresh subprocesses)
  python benchmarks/bench_table.py --cold X   # internal: one cold run of X in this process
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import common

PAPER_SECONDS = 37.0  # the paper's boolean-mapping time for OpenAI Five


def cold(what: str) -> dict:
  """First call in a fresh process: seconds, and peak RSS above the RSS after `import jax`."""
  rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far, MiB
  import jax
  base = rss()
  import models

  import jaxsurgery as js
  m = models.five()
  base_js = rss()
  t = time.perf_counter()
  if what == "table":
    table = js.dependency_table(m.fn, m.params, m.inputs, m.features)
  else:
    jax.make_jaxpr(m.fn)(m.params, m.inputs)
  seconds = time.perf_counter() - t
  peak = rss()
  out = {"seconds": seconds, "base_mb": base, "base_js_mb": base_js, "peak_mb": peak,
         "delta_mb": peak - base, "delta_js_mb": peak - base_js}
  if what == "table":
    out["table_mb"] = sum(a.nbytes for a in table.packed.values() if a is not None) / 2**20
  return out


def run_cold(what: str, repeats: int = 3) -> dict:
  """Median over `repeats` fresh subprocesses."""
  runs = []
  for _ in range(repeats):
    p = subprocess.run([sys.executable, __file__, "--cold", what], capture_output=True, text=True,
                       check=True)
    runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
  runs.sort(key=lambda r: r["seconds"])
  med = dict(runs[len(runs) // 2])
  for k in ("peak_mb", "delta_mb", "delta_js_mb"):  # worst case for memory
    med[k] = max(r[k] for r in runs)
  med["runs_s"] = [r["seconds"] for r in runs]
  return med


def main():
  import jax
  import models

  import jaxsurgery as js

  m = models.five()
  print(f"model {m.name}: {m.num_params:,} params, "
        f"{len(jax.tree.leaves(m.params))} leaves, {m.inputs['units'].shape} units")
  res = {"model": m.name, "num_params": m.num_params, "paper_s": PAPER_SECONDS}
  res["cold_table"] = run_cold("table")
  res["cold_jaxpr"] = run_cold("jaxpr")

  # Warm: a fresh model function each call (traced again), and the same function
  # (jaxsurgery's trace cache hits, so this is the interpretation alone).
  build = lambda f: js.dependency_table(f.fn, f.params, f.inputs, f.features)
  res["table_fresh"] = common.bench_fresh(models.five, build, n=7)
  res["jaxpr_fresh"] = common.bench_fresh(
      models.five, lambda f: jax.make_jaxpr(f.fn)(f.params, f.inputs), n=7)
  res["table_cached_trace"] = common.bench(
      lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features), n=7)
  table = build(m)
  res["num_features"] = table.num_features
  res["unknown_primitives"] = list(table.unknown_primitives)

  c = res["cold_table"]
  print(f"features: {table.num_features}")
  print(f"cold table (fresh process, first call): {common.fmt_s(c['seconds'])}  "
        f"runs {[round(s, 3) for s in c['runs_s']]}")
  print(f"cold make_jaxpr alone:                  {common.fmt_s(res['cold_jaxpr']['seconds'])}")
  print(f"warm table, fresh trace (median of 7):  {common.fmt_s(res['table_fresh']['median'])}")
  print(f"warm make_jaxpr alone (median of 7):    {common.fmt_s(res['jaxpr_fresh']['median'])}")
  print(f"warm table, cached trace (median of 7): {common.fmt_s(res['table_cached_trace']['median'])}")
  print(f"paper: ~{PAPER_SECONDS:.0f} s -> {PAPER_SECONDS / c['seconds']:.0f}x faster cold")
  print(f"peak RSS: {c['base_mb']:.0f} MB after `import jax`, {c['base_js_mb']:.0f} MB after "
        f"`import jaxsurgery` + model; after the table build {c['peak_mb']:.0f} MB: "
        f"+{c['delta_mb']:.1f} MB above `import jax` (+{c['delta_js_mb']:.1f} MB for the build "
        f"itself; make_jaxpr alone +{res['cold_jaxpr']['delta_js_mb']:.1f} MB); "
        f"packed table {c['table_mb'] * 1024:.1f} KiB")
  common.save("table", res)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--cold":
    print(json.dumps(cold(sys.argv[2])))
  else:
    main()
