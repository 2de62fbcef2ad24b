"""3. Gradient probe (jaxsurgery.gradient_table) against the boolean table, same features.

Five-style models with a growing LSTM (same 69 features); larger sizes are skipped
once a probe takes longer than BUDGET seconds.
"""

from __future__ import annotations

import jax

import common
import jaxsurgery as js
import models

WIDTHS = [256, 1024, 4096]
BUDGET = 60.0


def main():
  rows = []
  for width in WIDTHS:
    m = models.five(models.FiveConfig(lstm=width))
    P, X = models.concrete(m.params), models.concrete(m.inputs)
    probe = lambda: js.gradient_table(m.fn, P, X, m.features, key=jax.random.key(0))
    try:
      first, _ = common.timed(probe)
    except NotImplementedError:
      print("skipped: not implemented")
      common.save("probe", {"skipped": "NotImplementedError"})
      return
    t_probe = common.bench(probe, n=1 if first > 10 else 3)
    t_probe["first"] = first
    t_table = common.bench(lambda: js.dependency_table(m.fn, m.params, m.inputs, m.features), n=7)
    row = {"model": m.name, "num_params": m.num_params, "probe_s": t_probe["median"],
           "probe_first_s": first, "table_s": t_table["median"],
           "ratio": t_probe["median"] / t_table["median"]}
    if hasattr(js, "cross_check"):
      try:
        table = js.dependency_table(m.fn, m.params, m.inputs, m.features)
        row["cross_check"] = repr(js.cross_check(table, probe()))[:300]
      except NotImplementedError:
        pass
    rows.append(row)
    print(f"{m.name:16s} {m.num_params:>12,d} params, 69 features: gradient probe "
          f"{common.fmt_s(row['probe_s'])} (first {common.fmt_s(first)}), boolean table "
          f"{common.fmt_s(row['table_s'])} -> probe is {row['ratio']:.0f}x slower")
    if first > BUDGET:
      print(f"stopping: probe took > {BUDGET:.0f} s")
      break
  common.save("probe", rows)


if __name__ == "__main__":
  main()
