"""Restore memory: jaxsurgery.orbax.restore of a ~150M-parameter checkpoint, against a plain orbax restore.

  python benchmarks/bench_restore.py            # writes benchmarks/results/restore.json

The old state is a stack of dense layers (64 named input features, 10 layers of width
4096: ~151M float32 parameters, ~577 MiB), saved once with orbax's StandardCheckpointer.
The new model adds one input feature and widens the last hidden layer to 4160 units.
Each measurement runs in a fresh process (``bench_restore.py measure MODE DIR``):

* ``plain``: ``StandardCheckpointer().restore(dir, jso.old_abstract(dir))``, the old state as saved;
* ``jaxsurgery``: ``jso.restore(surgery, dir, new_init)`` (the surgery is planned from abstract
  shapes and ``new_init`` built before the measurement starts);
* ``phases``: the two steps ``jso.restore`` takes (see jaxsurgery/_src/integrations/orbax.py), one
  after the other, each measured on its own: the orbax restore of the whole old tree, then
  ``js.remap_state`` of the restored tree into ``new_init``;
* ``donated``: what the public API allows today: the same orbax restore, then the surgery under
  ``jax.jit(..., donate_argnums=0)``, so that XLA may reuse the restored old buffers for the
  outputs (every leaf the plan leaves unchanged). A reference for the attribution, not jso.restore.

Peak RSS is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs just before
the call), cross-checked by a thread sampling VmRSS every millisecond. *Increment* is the peak
minus the RSS just before the call: the memory the call itself needs, with ``new_init`` already
resident. Target (issue 13): jso.restore's increment < 1.5x the new state's bytes.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import common

N_FEATURES, WIDTH, LAYERS, WIDER, OUT = 64, 4096, 10, 4160, 16
REPEATS = 2
TARGET = 1.5
COMMAND = "python benchmarks/bench_restore.py"


# -- the model -----------------------------------------------------------------------------------

def param_shapes(new: bool) -> dict:
  f = N_FEATURES + (1 if new else 0)
  last = WIDER if new else WIDTH
  shapes = {"l0": {"w": (f, WIDTH), "b": (WIDTH,)}}
  for i in range(1, LAYERS):
    out = last if i == LAYERS - 1 else WIDTH
    shapes[f"l{i}"] = {"w": (WIDTH, out), "b": (out,)}
  shapes["out"] = {"w": (last, OUT), "b": (OUT,)}
  return shapes


def stack(p, x):
  import jax.numpy as jnp
  h = x
  for i in range(LAYERS):
    h = jnp.tanh(h @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"])
  return h @ p["out"]["w"] + p["out"]["b"]


def abstract(new: bool):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(new),
                      is_leaf=lambda s: isinstance(s, tuple))


def features(new: bool):
  import jaxsurgery as js
  return js.Features([f"f{i}" for i in range(N_FEATURES)] + (["added"] if new else []))


def plan():
  import jax
  import jax.numpy as jnp

  import jaxsurgery as js
  tables = [js.dependency_table(stack, abstract(new), jax.ShapeDtypeStruct((2, len(features(new).names)),
                                jnp.float32), features(new)) for new in (False, True)]
  return js.plan(*tables)


def concrete(new: bool, seed: int):
  """Random float32 arrays on the (one CPU) device, one leaf at a time so no second copy stays."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jax.device_put(rng.standard_normal(a.shape, np.float32)), abstract(new))


# -- measuring ---------------------------------------------------------------------------------------

def _status(key: str) -> int:
  """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


class Sampler:
  """Max VmRSS seen by a thread polling every millisecond (a cross-check of VmHWM)."""

  def __enter__(self):
    self.peak, self._stop = _status("VmRSS"), threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _status("VmRSS"))
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _status("VmRSS"))


def measured(fn):
  """``(result, {"before", "peak", "peak_sampled", "after", "seconds"})`` of one call, bytes."""
  import jax
  gc.collect()
  before = _status("VmRSS")
  reset = _reset_peak()
  t = time.perf_counter()
  with Sampler() as sampler:
    out = jax.block_until_ready(fn())
  seconds = time.perf_counter() - t
  peak = _status("VmHWM") if reset else sampler.peak
  return out, {"before": before, "peak": max(peak, sampler.peak), "peak_hwm": peak if reset else None,
               "peak_sampled": sampler.peak, "after": _status("VmRSS"), "seconds": seconds}


def _nbytes(tree) -> int:
  import jax
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(mode: str, directory: str) -> dict:
  import jax
  import orbax.checkpoint as ocp

  import jaxsurgery as js
  import jaxsurgery.orbax as jso
  path = os.path.join(directory, "old")
  out = {"mode": mode, "rss_after_imports": _status("VmRSS")}
  if mode == "plain":
    old_abstract = jso.old_abstract(path)
    restored, out["call"] = measured(lambda: ocp.StandardCheckpointer().restore(path, old_abstract))
    out["restored_bytes"] = _nbytes(restored)
    return out
  surgery = plan()
  new_init = concrete(True, seed=1)
  out["new_state_bytes"] = _nbytes(new_init)
  out["rss_with_new_init"] = _status("VmRSS")
  if mode == "jaxsurgery":
    _, out["call"] = measured(lambda: jso.restore(surgery, path, new_init))
  elif mode == "phases":   # jso.restore's two steps: the orbax restore of the old tree, then remap_state
    old_abstract = jso.old_abstract(path)
    old, out["orbax_restore_of_old_tree"] = measured(lambda: ocp.StandardCheckpointer().restore(path, old_abstract))
    out["old_state_bytes"] = _nbytes(old)
    _, out["remap_state"] = measured(lambda: js.remap_state(surgery, old, new_init))
  elif mode == "donated":
    old_abstract = jso.old_abstract(path)
    remap = jax.jit(lambda o, n: surgery(o, n), donate_argnums=0)
    _, out["call"] = measured(lambda: remap(ocp.StandardCheckpointer().restore(path, old_abstract), new_init))
  else:
    raise SystemExit(f"unknown mode {mode!r}")
  return out


# -- driver --------------------------------------------------------------------------------------------

def _run(*args) -> dict:
  p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=False, capture_output=True, text=True,
                     timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if p.returncode:
    raise RuntimeError(f"{args} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def save_checkpoint(directory: str) -> dict:
  import orbax.checkpoint as ocp
  old = concrete(False, seed=0)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, "old"), old)
    ckpt.wait_until_finished()
  return {"old_state_bytes": _nbytes(old), "parameters": sum(x.size for x in __import__("jax").tree.leaves(old))}


def _mib(x) -> float:
  return x / 2**20


def summarize(runs: dict, saved: dict) -> dict:
  new_bytes = runs["jaxsurgery"][0]["new_state_bytes"]
  def worst(mode, key="call"):
    return max(runs[mode], key=lambda r: r[key]["peak"] - r[key]["before"])[key]
  plain, ours = worst("plain"), worst("jaxsurgery")
  phases = runs["phases"][0]
  inc = lambda c: c["peak"] - c["before"]
  ours_inc = inc(ours)
  return {
      "new_state_mib": _mib(new_bytes), "old_state_mib": _mib(saved["old_state_bytes"]),
      "plain_increment_mib": _mib(inc(plain)), "plain_increment_over_new_state": inc(plain) / new_bytes,
      "jaxsurgery_increment_mib": _mib(ours_inc), "jaxsurgery_increment_over_new_state": ours_inc / new_bytes,
      "jaxsurgery_over_plain": ours_inc / inc(plain),
      "jaxsurgery_peak_above_imports_over_new_state":
          (ours["peak"] - runs["jaxsurgery"][0]["rss_after_imports"]) / new_bytes,
      "phase_orbax_restore_increment_mib": _mib(inc(phases["orbax_restore_of_old_tree"])),
      "phase_remap_state_increment_mib": _mib(inc(phases["remap_state"])),
      "donated_increment_mib": _mib(inc(worst("donated"))),
      "donated_increment_over_new_state": inc(worst("donated")) / new_bytes,
      "target": f"jso.restore increment < {TARGET}x the new state",
      "target_met": ours_inc < TARGET * new_bytes,
  }


def common_source() -> dict:
  """Which jaxsurgery was measured: the imported package and the repository's commit."""
  import jaxsurgery
  head = subprocess.run(["git", "-C", os.path.dirname(common.HERE), "rev-parse", "--short", "HEAD"],
                        check=False, capture_output=True, text=True).stdout.strip()
  return {"jaxsurgery": os.path.dirname(jaxsurgery.__file__), "commit": head}


def main():
  if len(sys.argv) > 1 and sys.argv[1] == "measure":
    print(json.dumps(measure(sys.argv[2], sys.argv[3])))
    return
  if len(sys.argv) > 1 and sys.argv[1] == "save":
    print(json.dumps(save_checkpoint(sys.argv[2])))
    return
  from run_all import machine
  mach, start = {**machine(), **common_source()}, time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="bench_restore_") as directory:
    saved = _run("save", directory)
    runs = {m: [] for m in ("plain", "jaxsurgery", "phases", "donated")}
    for _ in range(REPEATS):   # interleaved, so that neither mode gets a warmer page cache
      for m in ("plain", "jaxsurgery"):
        runs[m].append(_run("measure", m, directory))
    for m in ("phases", "donated"):
      runs[m].append(_run("measure", m, directory))
  summary = summarize(runs, saved)
  result = {"command": COMMAND, "machine": {**mach, "load_end": os.getloadavg()}, "model": {
      "old": f"{N_FEATURES} features -> {LAYERS} dense layers of {WIDTH} -> {OUT}",
      "new": f"+1 input feature, last hidden layer {WIDTH} -> {WIDER}", **saved},
      "summary": summary, "runs": runs, "total_s": time.perf_counter() - start}
  common.save("restore", result)
  s = summary
  print(f"old state {s['old_state_mib']:.0f} MiB ({saved['parameters']:,} params), "
        f"new state {s['new_state_mib']:.0f} MiB")
  print(f"plain orbax restore: +{s['plain_increment_mib']:.0f} MiB peak RSS "
        f"({s['plain_increment_over_new_state']:.2f}x)")
  print(f"jso.restore:         +{s['jaxsurgery_increment_mib']:.0f} MiB peak RSS "
        f"({s['jaxsurgery_increment_over_new_state']:.2f}x "
        f"the new state; {s['jaxsurgery_over_plain']:.2f}x plain) -> target < {TARGET}x: "
        f"{'pass' if s['target_met'] else 'FAIL'}")
  print(f"  its phases: orbax restore of the old tree +{s['phase_orbax_restore_increment_mib']:.0f} MiB, "
        f"remap_state +{s['phase_remap_state_increment_mib']:.0f} MiB")
  print(f"reference, orbax restore + jit(surgery, donate_argnums=0): +{s['donated_increment_mib']:.0f} MiB "
        f"({s['donated_increment_over_new_state']:.2f}x)")


if __name__ == "__main__":
  main()
