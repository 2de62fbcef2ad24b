"""Surgery fuzzing campaign: random model pairs, every broken invariant as a minimal reproducer.

    python scripts/fuzz.py --examples 500 [--seed 0] [--shrink-budget 60] [--kinds vec,seq,img]
                           [--family all|contraction-first] [--log failures.jsonl] [--replay failures.jsonl]

Each case is a model description and an edit (tests/fuzz_models.py); the invariants are those of
tests/test_fuzz.py (no crash; ``report.preserved is True`` implies ``js.verify`` within 1e-5;
moved values exactly where the edit puts them; ``report.dropped_elements()`` is exactly what the
edit removed). Failures are grouped by class (check and kind of parameter), and the smallest case
of each class is shrunk greedily (fewer edits, layers, features, units) while it keeps failing
the same way. The output is one ``check_pair(...)`` line per class, runnable in
``python -c "from fuzz_models import *; print(check_pair(...))"`` from tests/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fuzz_models as fm
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed

SIMPLER = {"lstm": "gru", "gru": "elman", "index": "uid", "NCHW": "NHWC", "flatten": "mean", "rms": "ln",
           "seq": "vec"}


def _variants(obj):
  """Simpler versions of a description or edit list: an element dropped, a number lowered..."""
  if isinstance(obj, tuple):
    for i in range(len(obj)):
      yield obj[:i] + obj[i + 1:]
    for i, x in enumerate(obj):
      for v in _variants(x):
        yield obj[:i] + (v,) + obj[i + 1:]
  elif dataclasses.is_dataclass(obj):
    for f in dataclasses.fields(obj):
      if f.name in ("uid", "name", "leaf"):
        continue
      for v in _variants(getattr(obj, f.name)):
        yield dataclasses.replace(obj, **{f.name: v})
  elif isinstance(obj, bool):
    if obj:
      yield False
  elif isinstance(obj, int):
    if obj > 0:
      yield obj - 1
  elif isinstance(obj, str) and SIMPLER.get(obj):
    yield SIMPLER[obj]


def _size(case) -> int:
  spec, edits = case
  return len(repr(spec)) + len(repr(edits))


WIDEN: list = [None]  # the recipe passed to js.plan (--widen)


def failing_classes(case, numeric=True) -> dict[str, fm.Failure]:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      failures = fm.check_pair(*case, numeric=numeric, widen=WIDEN[0])
  except fm.InvalidSpec:
    return {}
  except AssertionError as e:  # the generator cannot run this description: report, skip
    print(f"  skipped (generator): {str(e)[:200]}", flush=True)
    return {}
  out: dict[str, fm.Failure] = {}
  for f in failures:
    out.setdefault(fm.signature(f), f)
  return out


def shrink(case, cls: str, budget: int):
  """Greedy: take the first simpler valid case that still fails with ``cls``, until none does."""
  numeric = cls.startswith("preserved but verify")
  evaluations, improved = 0, True
  while improved and evaluations < budget:
    improved = False
    for cand in (c for part in (0, 1) for c in _candidates(case, part)):
      if evaluations >= budget:
        break
      evaluations += 1
      if cls in failing_classes(cand, numeric):
        case, improved = cand, True
        break
  return case, evaluations


def _candidates(case, part):
  spec, edits = case
  if part == 0:
    yield from ((spec, e) for e in _variants(edits))
  else:
    yield from ((s, edits) for s in _variants(spec))


def campaign(examples: int, seed: int, family: dict, log=None) -> tuple[dict, int]:
  found: dict[str, tuple] = {}  # class -> (smallest case, its failure, number of cases)
  counter = [0]

  @hseed(seed)
  @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck))
  @given(fm.pairs(**family))
  def run(case):
    counter[0] += 1
    classes = failing_classes(case)
    if log and classes:
      log.write(json.dumps({"case": fm.reproducer(*case), "failures": [str(f) for f in classes.values()]}) + "\n")
      log.flush()
    for cls, failure in classes.items():
      prev = found.get(cls)
      count = (prev[2] if prev else 0) + 1
      found[cls] = (case, failure, count) if prev is None or _size(case) < _size(prev[0]) else prev[:2] + (count,)
    if counter[0] % 50 == 0:
      print(f"  {counter[0]} cases, {len(found)} failure classes", flush=True)

  run()
  return found, counter[0]


def replay(path) -> tuple[dict, int]:
  """The failure classes of a --log file, re-checked (the library may have changed since)."""
  namespace = {k: getattr(fm, k) for k in dir(fm)} | {"check_pair": lambda spec, edits=(): (spec, edits)}
  found: dict[str, tuple] = {}
  n = 0
  with open(path) as f:
    for line in f:
      case = eval(json.loads(line)["case"], namespace)  # our own log of reproducer expressions
      n += 1
      for cls, failure in failing_classes(case).items():
        prev = found.get(cls)
        count = (prev[2] if prev else 0) + 1
        found[cls] = (case, failure, count) if prev is None or _size(case) < _size(prev[0]) else prev[:2] + (count,)
  return found, n


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=200, help="generated cases")
  parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same seed gives the same cases)")
  parser.add_argument("--shrink-budget", type=int, default=60, help="checks per failure class (0: no shrinking)")
  parser.add_argument("--kinds", default="vec,seq,img", help="with --family all: the model kinds")
  parser.add_argument("--family", default="all", choices=sorted(fm.FAMILIES),
                      help="all, or contraction-first: the family tests/test_fuzz.py generates in CI")
  parser.add_argument("--log", help="write every failing case (JSON lines) to this file")
  parser.add_argument("--replay", help="shrink the failing cases of a --log file instead of generating")
  parser.add_argument("--widen", default="default", help="js.plan's widen= where it exists: auto, zero, clone or "
                      "default (the planner's own)")
  args = parser.parse_args(argv)
  WIDEN[0] = None if args.widen == "default" else args.widen
  t0 = time.time()
  if args.replay:
    found, n = replay(args.replay)
  else:
    with open(args.log or os.devnull, "w") as log:
      family = fm.FAMILIES[args.family] or {"kinds": tuple(args.kinds.split(","))}
      found, n = campaign(args.examples, args.seed, family, log if args.log else None)
  print(f"{n} cases in {time.time() - t0:.0f} s: {len(found)} failure classes", flush=True)
  shrunk: dict[str, list] = {}  # reproducer -> [(class, count, failure)]
  for cls, (case, failure, count) in sorted(found.items(), key=lambda kv: -kv[1][2]):
    if args.shrink_budget:
      case, _ = shrink(case, cls, args.shrink_budget)
      failure = failing_classes(case, cls.startswith("preserved but verify")).get(cls, failure)
    shrunk.setdefault(fm.reproducer(*case), []).append((cls, count, failure))
    print(f"  shrunk [{count} cases] {cls}", flush=True)
  print(f"\n{len(shrunk)} distinct reproducers:")
  for repro, classes in shrunk.items():
    print()
    for cls, count, failure in classes:
      print(f"[{count} cases] {cls}\n  {failure}")
    print(f"  {repro}", flush=True)
  print(f"\ntotal {time.time() - t0:.0f} s")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main())
