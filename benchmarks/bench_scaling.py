"""5. Scaling of the table build: number of features, number of parameters, scan length.

Each point: median of 9 calls after one warm-up, a fresh model function per call
(so JAX traces every time), next to make_jaxpr alone. Writes scaling.png.
"""

from __future__ import annotations

import os

import common
import jax
import models

import jaxsurgery as js

SWEEPS = {
    # name: (x label, x values, builder)
    "features": ("number of features (16384-wide MLP input)", [1, 16, 256, 4096, 16384],
                 lambda x: models.wide_mlp(x)),
    "params": ("number of parameters (Five, LSTM width 256 -> 4096)", [256, 512, 1024, 2048, 4096],
               lambda x: models.five(models.FiveConfig(lstm=x))),
    "scan": ("scan length (Five, LSTM 4096)", [1, 4, 16, 64],
             lambda x: models.five(models.FiveConfig(steps=x))),
}


def table(m):
  return js.dependency_table(m.fn, m.params, m.inputs, m.features)


def point(build, x, n=9):
  t = common.bench_fresh(lambda: build(x), table, n)
  j = common.bench_fresh(lambda: build(x), lambda m: jax.make_jaxpr(m.fn)(m.params, m.inputs), n)
  m = build(x)
  return {"x": x, "num_params": m.num_params, "table_s": t["median"], "table_first_s": t["first"],
          "jaxpr_s": j["median"]}


def plot(res, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
  for ax, (name, (label, _, _)) in zip(axes, SWEEPS.items()):
    pts = res[name]
    xs = [p["num_params"] if name == "params" else p["x"] for p in pts]
    ax.plot(xs, [p["table_s"] * 1e3 for p in pts], "o-", label="dependency_table (total)")
    ax.plot(xs, [p["jaxpr_s"] * 1e3 for p in pts], "s--", label="make_jaxpr alone")
    ax.set_xscale("log", base=2 if name != "params" else 10)
    ax.set_yscale("log")
    ax.set_ylim(0.3, 100)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(label)
  axes[0].set_ylabel("time, ms (median of 9, warm, fresh trace)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
  fig.suptitle("jaxsurgery table build scaling (abstract shapes, CPU)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  res = {}
  for name, (_, xs, build) in SWEEPS.items():
    res[name] = [point(build, x) for x in xs]
    for p in res[name]:
      print(f"{name:9s} x={p['x']:<6d} params={p['num_params']:>12,d}  table "
            f"{common.fmt_s(p['table_s']):>9s}  make_jaxpr {common.fmt_s(p['jaxpr_s']):>9s}")
  common.save("scaling", res)
  plot(res, os.path.join(common.HERE, "scaling.png"))


if __name__ == "__main__":
  main()
