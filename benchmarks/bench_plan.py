"""Planning speed and memory (issue 13): `js.plan` from abstract shapes, nothing allocated.

1. The widened Five model: LSTM 4096 -> 4352, hidden 128 -> 160, +1 unit feature, +1 action
   (outputs named): plan time (median of 3 after a warm-up) and peak RSS above `import jax`, in a
   fresh subprocess so that nothing else is resident.
2. Plan time against LSTM width 1024 -> 8192 (the same widening by 1/16 and +32 hidden): against
   the parameter count; plotted to plan_scaling.png.
3. A 1,000-layer stack of small dense layers (2,000 leaves) gaining one layer in the middle.

Usage: python benchmarks/bench_plan.py            (writes results/plan.json and plan_scaling.png)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import common

COMMAND = "python benchmarks/bench_plan.py"
TARGETS = {"five_plan_s": 1.0, "five_plan_rss_mib": 300.0, "stack_plan_s": 1.0}


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _five_pair(lstm: int, hidden: int = 128):
  import jax.numpy as jnp  # noqa: F401  (imported before the baseline RSS)
  import models

  import jaxsurgery as js
  old_cfg = models.FiveConfig(lstm=lstm, hidden=hidden)
  new_cfg = dataclasses.replace(old_cfg, lstm=lstm + lstm // 16, hidden=hidden + 32,
                                unit_features=old_cfg.unit_features + 1, action_types=old_cfg.action_types + 1)
  tables = []
  for cfg in (old_cfg, new_cfg):
    m = models.five(cfg)
    outputs = {"action_type": js.Features([f"action{i}" for i in range(cfg.action_types)]), "move": None,
               "target": None, "value": None}
    tables.append(js.dependency_table(m.fn, m.params, m.inputs, m.features, outputs=outputs))
  return tables


def _stack_pair(layers: int = 1000, width: int = 8):
  import jax
  import jax.numpy as jnp

  import jaxsurgery as js

  def make(n, insert_at=None):
    names = [f"l{i}" for i in range(n)]
    if insert_at is not None:
      names.insert(insert_at, "inserted")

    def fn(p, x):
      for k in names:
        x = x + jnp.tanh(x @ p[k]["w"] + p[k]["b"])
      return x
    params = {k: {"w": jax.ShapeDtypeStruct((width, width), jnp.float32),
                  "b": jax.ShapeDtypeStruct((width,), jnp.float32)} for k in names}
    return fn, params
  x = jax.ShapeDtypeStruct((2, width), jnp.float32)
  feats = js.Features([f"f{i}" for i in range(width)])
  (fo, po), (fn_, pn) = make(layers), make(layers, insert_at=layers // 2)
  return js.dependency_table(fo, po, x, feats), js.dependency_table(fn_, pn, x, feats)


def _time_plan(tables, n: int = 3) -> tuple[float, float, dict]:
  import jaxsurgery as js
  first = time.perf_counter()
  s = js.plan(*tables)
  first = time.perf_counter() - first
  times = []
  for _ in range(n):
    t = time.perf_counter()
    js.plan(*tables)
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2], first, {"preserved": s.report.preserved, "leaves": len(s.report.leaves)}


def measure(what: str, arg: int) -> dict:
  """Runs in a fresh process: RSS above `import jax`, then tables, then plan."""
  import jax  # noqa: F401
  base = _rss_mib()
  t = time.perf_counter()
  tables = _five_pair(arg) if what == "five" else _stack_pair(arg)
  tables_s = time.perf_counter() - t
  after_tables = _rss_mib()
  plan_s, first_s, info = _time_plan(tables)
  return {"what": what, "arg": arg, "tables_s": tables_s, "plan_s": plan_s, "plan_first_s": first_s,
          "rss_above_import_jax_mib": _rss_mib() - base, "plan_rss_above_tables_mib": _rss_mib() - after_tables,
          "params_new": sum(int(__import__("numpy").prod(s)) for s in tables[1].shapes.values()), **info}


def _run(what: str, arg: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, os.path.abspath(__file__), "measure", what, str(arg)], capture_output=True,
                     text=True, timeout=1800, env=env, check=False)
  if p.returncode:
    raise RuntimeError(f"{what} {arg} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  xs, ys = [r["params_new"] for r in rows], [r["plan_s"] for r in rows]
  ax.loglog(xs, ys, "o-", label="js.plan (widened Five)")
  ax.loglog(xs, [ys[0] * x / xs[0] for x in xs], "--", color="grey", label="linear in parameters")
  for r in rows:
    ax.annotate(f"L{r['arg']}", (r["params_new"], r["plan_s"]), fontsize=7, textcoords="offset points", xytext=(3, -9))
  ax.set_xlabel("parameters of the new model")
  ax.set_ylabel("plan time (s, median of 3)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)


def main():
  mach, start = common.machine(), time.perf_counter()
  five = _run("five", 4096)
  sweep = [_run("five", L) for L in (1024, 2048, 4096, 8192)]
  stack = _run("stack", 1000)
  verdicts = {"five_plan_s": five["plan_s"] < TARGETS["five_plan_s"],
              "five_plan_rss_mib": five["rss_above_import_jax_mib"] < TARGETS["five_plan_rss_mib"],
              "stack_plan_s": stack["plan_s"] < TARGETS["stack_plan_s"]}
  common.save("plan", {"command": COMMAND, "machine": {**mach, "load_end": os.getloadavg()}, "targets": TARGETS,
                       "five": five, "sweep": sweep, "stack": stack, "target_met": verdicts,
                       "total_s": time.perf_counter() - start})
  plot(sweep, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_scaling.png"))
  print(f"widened Five (LSTM 4096->4352, hidden 128->160, +1 feature, +1 action): plan {five['plan_s']:.2f} s "
        f"(first {five['plan_first_s']:.2f} s), peak RSS +{five['rss_above_import_jax_mib']:.0f} MiB above import jax "
        f"(tables {five['tables_s']:.2f} s), preserved={five['preserved']}")
  for r in sweep:
    print(f"  LSTM {r['arg']:5d}: {r['params_new'] / 1e6:7.1f}M params, plan {r['plan_s']:.3f} s")
  print(f"1000-layer stack + 1 layer: plan {stack['plan_s']:.2f} s (first {stack['plan_first_s']:.2f} s), "
        f"preserved={stack['preserved']}")
  print("targets:", {k: "pass" if v else "FAIL" for k, v in verdicts.items()})


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "measure":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
  else:
    main()
