"""Per-device memory of the sharded surgery, from the compiled program's memory_analysis().

  python benchmarks/bench_sharded.py            # writes benchmarks/results/sharded.json

8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), a 2x4
("data", "model") mesh with Auto axes. The model and layouts are those of
tests/test_distributed.py (defined in tests/distributed_worker.py): a 3-layer MLP whose new
version reorders its 8 input features, adds 8, and widens both hidden layers (32 -> 48 and
64 -> 80 units, times ``scale``). Layouts: ``fsdp`` (each leaf's largest axis over both mesh
axes), ``fsdp_data`` (over "data" only), ``tp`` (kernels column / row sharded over "model").

For each scale and layout, lowered from sharded abstract shapes (nothing is allocated, so the
~150M-parameter scale is cheap) and compiled; ``temp`` is ``memory_analysis().temp_size_in_bytes``,
the per-device scratch memory of the SPMD program. Target (issue 13): temp <= ~2x the largest
leaf's per-device shard. Two ways to run it:

* ``params`` / ``adam_state``: inside the user's ``jax.jit(..., out_shardings=new layout)``, one
  program for the whole tree;
* ``params_programs`` / ``adam_state_programs``: the programs an eager ``surgery(...)`` /
  ``remap_state`` runs once the moving leaves pass ``remap.PROGRAM_BYTES`` (set to 0 here, so at
  every scale the split is that of leaves > 64 MiB); the largest temp over its programs.

As a reference, the largest leaf (l2/w, widened on both axes) is also compiled alone two ways:
``take`` (jnp.take per axis, then where) and ``pad`` (one jnp.pad, then where: what the surgery
does for a prefix map).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import common

SCALES = (8, 64, 200)   # 200: ~154M new parameters
LAYOUTS = ("fsdp", "fsdp_data", "tp")
TARGET = 2.0
WHATS = ("params", "adam_state", "params_programs", "adam_state_programs")
COMMAND = "python benchmarks/bench_sharded.py"
TESTS = os.path.join(os.path.dirname(common.HERE), "tests")


def _largest_leaf_reference(w, scale: int, layout: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  mesh = w.auto_mesh()
  old_a, new_a = w.abstract_params(scale, True)["l2"]["w"], w.abstract_params(scale, False)["l2"]["w"]
  s_old = jax.sharding.NamedSharding(mesh, w.spec(layout, "l2/w", old_a.shape))
  s_new = jax.sharding.NamedSharding(mesh, w.spec(layout, "l2/w", new_a.shape))
  old = jax.ShapeDtypeStruct(old_a.shape, old_a.dtype, sharding=s_old)
  new = jax.ShapeDtypeStruct(new_a.shape, new_a.dtype, sharding=s_new)
  (r, c), (nr, nc) = old_a.shape, new_a.shape
  rows, cols = np.arange(nr)[:, None] < r, np.arange(nc)[None] < c   # broadcast in the program, as the surgery does
  valid = lambda: jnp.asarray(rows) & jnp.asarray(cols)
  def take(o, n):
    x = jnp.take(o, np.minimum(np.arange(nr), r - 1), axis=0)
    return jnp.where(valid(), jnp.take(x, np.minimum(np.arange(nc), c - 1), axis=1), n)
  def pad(o, n):
    return jnp.where(valid(), jnp.pad(o, [(0, nr - r), (0, nc - c)]), n)
  shard = int(np.prod(s_new.shard_shape(new_a.shape))) * 4
  out = {"shard_bytes": shard}
  for name, f in (("take", take), ("pad", pad)):
    temp = jax.jit(f, out_shardings=s_new).lower(old, new).compile().memory_analysis().temp_size_in_bytes
    out[name] = {"temp_bytes": int(temp), "temp_over_shard": temp / shard}
  return out


def measure(scale: int) -> list[dict]:
  """Runs on 8 devices (a subprocess of main)."""
  sys.path.insert(0, TESTS)
  import distributed_worker as w
  t = time.perf_counter()
  w.plan(scale)   # cached: the rows' seconds are lowering and compiling only
  plan_s = time.perf_counter() - t
  rows = []
  for layout in LAYOUTS:
    t = time.perf_counter()
    row = w.memory(scale, layout)
    row["seconds"], row["plan_seconds"] = time.perf_counter() - t, plan_s
    t = time.perf_counter()
    row["l2_w_alone"] = _largest_leaf_reference(w, scale, layout)
    row["l2_w_alone"]["seconds"] = time.perf_counter() - t
    rows.append(row)
  return rows


def _run(scale: int) -> list[dict]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, os.path.abspath(__file__), "measure", str(scale)], check=False,
                     capture_output=True, text=True, timeout=900, env=env)
  if p.returncode:
    raise RuntimeError(f"scale {scale} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def _line(row: dict, what: str) -> str:
  s = row[what]
  ok = s["temp_over_largest_shard"] <= TARGET
  return (f"  {row['layout']:<10} {what:<20} {s['parameters']:>12,} params  largest shard "
          f"{s['largest_shard_bytes'] / 2**20:8.2f} MiB ({s['largest_shard_leaf']})  temp "
          f"{s['temp_bytes'] / 2**20:8.2f} MiB = {s['temp_over_largest_shard']:5.2f}x  {'pass' if ok else 'FAIL'}")


def common_source() -> dict:
  """Which jaxsurgery was measured: the imported package and the repository's commit."""
  import jaxsurgery
  head = subprocess.run(["git", "-C", os.path.dirname(common.HERE), "rev-parse", "--short", "HEAD"],
                        check=False, capture_output=True, text=True).stdout.strip()
  return {"jaxsurgery": os.path.dirname(jaxsurgery.__file__), "commit": head}


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "measure":
    print(json.dumps(measure(int(sys.argv[2]))))
    return
  from run_all import machine
  mach, start = {**machine(), **common_source()}, time.perf_counter()
  rows = [row for scale in SCALES for row in _run(scale)]
  verdicts = {f"{r['layout']}/{what}/scale {r['scale']}": r[what]["temp_over_largest_shard"] <= TARGET
              for r in rows for what in WHATS}
  common.save("sharded", {"command": COMMAND, "machine": {**mach, "load_end": os.getloadavg()}, "devices": 8,
                          "mesh": "2x4 (data, model)",
                          "target": f"temp_size_in_bytes <= {TARGET}x the largest leaf's per-device shard",
                          "rows": rows, "target_met": verdicts, "total_s": time.perf_counter() - start})
  for scale in SCALES:
    print(f"scale {scale}:")
    for r in (r for r in rows if r["scale"] == scale):
      for what in WHATS:
        print(_line(r, what))
      ref = r["l2_w_alone"]
      print(f"  {'':<10} l2/w alone: take {ref['take']['temp_over_shard']:.2f}x, "
            f"pad {ref['pad']['temp_over_shard']:.2f}x its shard")


if __name__ == "__main__":
  main()
