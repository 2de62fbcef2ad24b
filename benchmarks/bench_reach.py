"""Reach (the backward masks over output names) at OpenAI-Five scale (abstract shapes).

  python benchmarks/bench_reach.py

Measures, on ``models.five()`` with every head's positions named (32 action types, 81 moves,
189 target units, the value: 303 output names):

* the table build with and without ``outputs=`` (same function object: the trace is cached,
  so this is the interpretation alone; the target is at most 2x slower with names);
* the reverse pass alone (``reach_masks``: packed masks of every parameter leaf, computed
  once per table when ``reach`` is first asked);
* ``table.reach(path)`` for the heads' kernels (the dense bool view, ``param.shape + (303,)``).
  Dense views of the 4096 x 16384 LSTM kernels would take 20 GB; the packed masks are
  compressed (``(1, 1, W)``: every element reaches every output).

Writes benchmarks/results/reach.json.
"""

from __future__ import annotations

import common


def main():
  import models

  import jaxsurgery as js
  from jaxsurgery._src.core import reach as R

  m = models.five()
  outputs = {"action_type": js.Features(models.names("act", 32)), "move": js.Features(models.names("move", 81)),
             "target": js.Features(models.names("unit", 189)), "value": "value"}
  res = {"model": m.name, "num_params": m.num_params, "machine": common.machine()}
  plain = lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features)
  named = lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features, outputs=outputs)
  named()
  res["table"] = common.bench(plain, n=7)
  res["table_outputs"] = common.bench(named, n=7)
  table = named()
  res["num_output_names"] = len(table.output_features)
  res["reach_masks"] = common.bench(lambda: R.reach_masks(table.jaxpr, len(table.paths), table.output_spec), n=7)
  heads = [p for p in table.paths if p.startswith("heads/") and p.endswith("kernel")]
  res["reach_heads_dense"] = common.bench_fresh(named, lambda t: [t.reach(p) for p in heads], n=5)
  res["heads"] = heads
  masks = R.reach_masks(table.jaxpr, len(table.paths), table.output_spec)
  res["packed_kib"] = sum(x.nbytes for x in masks if x is not None) / 1024
  res["ratio_outputs_vs_plain"] = res["table_outputs"]["median"] / res["table"]["median"]
  res["ratio_table_plus_reach_vs_plain"] = (res["table_outputs"]["median"] + res["reach_masks"]["median"]) \
      / res["table"]["median"]
  res["machine"]["load_end"] = __import__("os").getloadavg()

  print(f"model {m.name}: {m.num_params:,} params, {len(table.paths)} leaves, "
        f"{res['num_output_names']} output names")
  print(f"table, no output names (median of 7):   {common.fmt_s(res['table']['median'])}")
  print(f"table, with outputs= (median of 7):     {common.fmt_s(res['table_outputs']['median'])} "
        f"({res['ratio_outputs_vs_plain']:.2f}x)")
  print(f"reach_masks, every leaf (median of 7):  {common.fmt_s(res['reach_masks']['median'])} "
        f"(first {common.fmt_s(res['reach_masks']['first'])}); packed {res['packed_kib']:.1f} KiB")
  print(f"table with outputs + reach vs plain:    {res['ratio_table_plus_reach_vs_plain']:.2f}x")
  print(f"reach(path) for {len(heads)} head kernels, fresh table (median of 5): "
        f"{common.fmt_s(res['reach_heads_dense']['median'])}")
  common.save("reach", res)


if __name__ == "__main__":
  main()
