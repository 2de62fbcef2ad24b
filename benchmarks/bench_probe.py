"""3. Gradient probe (jaxsurgery.gradient_table) against the boolean table, same features.

Five-style models (the same 69 features as the 150M model, 189 units, 16 steps) with
vocabularies cut to 16 unit / item types: the probe compares every categorical id, so
the default 512 + 256 ids would give 579 probe columns instead of 99. Default
gradient_table settings otherwise (draws, chunk_size). Each gradient_table call
compiles again, so there is no separate warm-up; a size is skipped once a call
takes longer than BUDGET seconds.
"""

from __future__ import annotations

import inspect

import jax

import common
import jaxsurgery as js
import models

WIDTHS = [256, 1024]
BUDGET = 120.0


def main():
  rows = []
  sig = inspect.signature(js.gradient_table).parameters
  defaults = {k: sig[k].default for k in ("draws", "chunk_size") if k in sig}
  for width in WIDTHS:
    m = models.five(models.FiveConfig(lstm=width, unit_types=16, item_types=16))
    P, X = models.concrete(m.params), models.concrete(m.inputs)
    probe = lambda: js.gradient_table(m.fn, P, X, m.features, key=jax.random.key(0),
                                      progress=False)
    try:
      first, result = common.timed(probe)
    except NotImplementedError:
      print("skipped: not implemented")
      common.save("probe", {"skipped": "NotImplementedError"})
      return
    second = common.timed(probe)[0] if first < BUDGET / 2 else None
    boolean = lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features)
    t_table = common.bench(boolean, n=7)["median"]
    probe_s = first if second is None else second
    row = {"model": m.name, "num_params": m.num_params, "num_features": len(result.features),
           "probe_s": probe_s, "probe_first_s": first, "probe_second_s": second,
           "table_s": t_table, "ratio": probe_s / t_table,
           "cross_check_ok": bool(js.cross_check(boolean(), result).ok), **defaults}
    rows.append(row)
    print(f"{m.name:16s} {m.num_params:>12,d} params, 69 features: gradient probe "
          f"{common.fmt_s(probe_s)} (first call {common.fmt_s(first)}), boolean table "
          f"{common.fmt_s(row['table_s'])} -> probe is {row['ratio']:,.0f}x slower; "
          f"cross_check ok: {row['cross_check_ok']}")
    if first > BUDGET:
      print(f"stopping: probe took > {BUDGET:.0f} s")
      break
  common.save("probe", rows)


if __name__ == "__main__":
  main()
