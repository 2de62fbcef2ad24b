"""4. Applying the remap to ~150M float32 parameters, against a plain jitted copy of the tree.

Old model: benchmarks.models.five(); new model: one more unit feature (44), LSTM unchanged.
"""

from __future__ import annotations

import common
import jax
import jax.numpy as jnp
import models

import jaxsurgery as js


def main():
  if not hasattr(js, "plan"):
    print("skipped: not implemented (jaxsurgery.plan missing)")
    common.save("remap", {"skipped": "jaxsurgery.plan missing"})
    return
  old = models.five()
  new = models.five(models.FiveConfig(unit_features=44))
  t_tables, (old_t, new_t) = common.timed(lambda: (
      js.dependency_table(old.fn, old.params, old.inputs, old.features),
      js.dependency_table(new.fn, new.params, new.inputs, new.features)))
  try:
    t_plan = common.bench(lambda: js.plan(old_t, new_t), n=3)
  except NotImplementedError:
    print("skipped: not implemented")
    common.save("remap", {"skipped": "NotImplementedError"})
    return
  surgery = js.plan(old_t, new_t)
  print(f"tables {common.fmt_s(t_tables)}, plan {common.fmt_s(t_plan['median'])} "
        f"(first {common.fmt_s(t_plan['first'])}); totals {surgery.report.totals()}")

  old_params = models.concrete(old.params, seed=0)
  new_init = models.concrete(new.params, seed=1)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(new_init))
  remap = jax.jit(surgery)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  res = {"num_params": new.num_params, "mb": nbytes / 2**20, "tables_s": t_tables,
         "plan_s": t_plan["median"], "plan_first_s": t_plan["first"]}
  # Alternate the two so that neither benefits from a warmer cache / allocator.
  res["copy"] = common.bench(lambda: copy(new_init), n=7, block=True)
  res["remap"] = common.bench(lambda: remap(old_params, new_init), n=7, block=True)
  res["copy2"] = common.bench(lambda: copy(new_init), n=7, block=True)
  res["copy"]["median"] = min(res["copy"]["median"], res.pop("copy2")["median"])
  res["ratio"] = res["remap"]["median"] / res["copy"]["median"]
  print(f"{new.num_params:,} params ({res['mb']:.0f} MB): jit(surgery) "
        f"{common.fmt_s(res['remap']['median'])} (first incl. compile "
        f"{common.fmt_s(res['remap']['first'])}), jit(copy) {common.fmt_s(res['copy']['median'])} "
        f"(first {common.fmt_s(res['copy']['first'])}) -> {res['ratio']:.2f}x a plain copy")
  common.save("remap", res)


if __name__ == "__main__":
  main()
