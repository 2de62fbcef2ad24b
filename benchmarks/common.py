"""Shared helpers: timing, result files."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)


def timed(f, *args):
  """(seconds, result) of one call."""
  t = time.perf_counter()
  out = f(*args)
  return time.perf_counter() - t, out


def bench(f, n=5, warmup=1, block=False):
  """{"first": first call, "median": median of n calls after warm-up, "runs": [...]}, seconds."""
  call = (lambda: _block(f())) if block else f
  first, _ = timed(call)
  for _ in range(warmup - 1):
    call()
  runs = [timed(call)[0] for _ in range(n)]
  return {"first": first, "median": statistics.median(runs), "runs": runs}


def bench_fresh(build, run, n=5):
  """Like bench, but each call gets its own instance from ``build()`` (built outside the timing)."""
  pool = iter([build() for _ in range(n + 1)])
  return bench(lambda: run(next(pool)), n=n)


def _block(x):
  import jax
  return jax.block_until_ready(x)


def save(name: str, data) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(data, f, indent=1, default=str)


def load(name: str):
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def fmt_s(s: float) -> str:
  if s is None:
    return "n/a"
  if s < 1e-3:
    return f"{s * 1e6:.0f} µs"
  if s < 1:
    return f"{s * 1e3:.1f} ms"
  return f"{s:.2f} s"


def machine() -> dict:
  """The machine and library versions a result was measured with (and the load at the start)."""
  import datetime
  import importlib.metadata
  import platform

  import jax
  import jaxlib
  import numpy
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
             platform.processor())
  mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
  versions = {}
  for name in ("flax", "optax", "asdex", "orbax-checkpoint"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": mem / 2**20,
          "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "numpy": numpy.__version__, **versions, "platform": platform.platform(),
          "backend": jax.default_backend(), "load": os.getloadavg(),
          "date": datetime.datetime.now().isoformat(timespec="seconds")}
