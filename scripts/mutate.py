# ruff: noqa: E501  (the mutant table quotes source lines whole)
"""Hand-written mutation testing for jaxsurgery (issue 16).

Each mutant is one realistic one-line bug: ``(file, original substring, replacement, description, tests)``.
The script applies one mutant at a time to a git worktree of HEAD (never to the working copy) and runs tests there
(``-x``): stage 1 is ``tests/test_mutants.py`` (~20 s); a stage-1 survivor then runs its wider subset (rules:
``test_rules.py``; planner: ``test_relations.py`` and ``test_surgery.py``; state: ``test_optim.py``). A failing
test kills the mutant; passing both stages, it survives.

  python scripts/mutate.py --list           # the mutants
  python scripts/mutate.py                  # run them all; table + score; scripts/mutants_report.json
  python scripts/mutate.py --only 3 --only 7  # some of them (by number)

mutmut / cosmic-ray rewrite modules at import time, which JAX's import-time primitive registration does not
survive; a worktree and plain text replacement do. ``--keep`` leaves the worktree (``/tmp/mut_wt``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WT = "/tmp/mut_wt"
RULES = "jaxsurgery/_src/rules/"
REL = "jaxsurgery/_src/surgery/relations/"
SUR = "jaxsurgery/_src/surgery/"

# Test subsets (tests/test_mutants.py first: it is fast and aimed at these classes; -x stops at a kill).
T_RULES = ["tests/test_mutants.py", "tests/test_rules.py"]
T_PLAN = ["tests/test_mutants.py", "tests/test_relations.py", "tests/test_surgery.py"]
T_STATE = ["tests/test_mutants.py", "tests/test_optim.py"]
T_SCAN = T_RULES + ["tests/test_regressions_15.py"]   # scan causality (issue 15.8)

MUTANTS = [
    # -- rules/contraction.py
    (RULES + "contraction.py", "  if rhs.mask is not None:  # kernel masks", "  if False:  # kernel masks",
     "conv ignores a feature-dependent kernel", T_RULES),
    (RULES + "contraction.py", "    ctx.touch(lhs, M.uniform(M.reduce_all(rhs.mask), lhs.ndim))", "    pass",
     "conv: a parameter image is not touched by a feature kernel", T_RULES),
    (RULES + "contraction.py", "    m = M.reduce_or(m, [0] + list(range(2, r)), keepdims=False)  # (C or 1, W)",
     "    m = M.reduce_or(m, list(range(1, r)), keepdims=True)[0]  # (C or 1, W)",
     "conv kernel touch: OR over channels instead of positions", T_RULES),
    (RULES + "contraction.py", "      m = np.repeat(m, O // G, axis=1)", "      m = np.tile(m, (1, O // G) + (1,) * (m.ndim - 2))",
     "conv groups: output channels tiled instead of repeated", T_RULES),
    (RULES + "contraction.py", "  m = M.reduce_or(M.lift(m, rank), contract, keepdims=True)",
     "  m = M.reduce_or(M.lift(m, rank), free, keepdims=True)",
     "dot_general: OR over the free axes instead of the contracted ones", T_RULES),
    (RULES + "contraction.py", "  if rhs.pull is not None and lhs.mask is not None:\n    ctx.touch(rhs, _operand_touch",
     "  if rhs.pull is not None and rhs.mask is not None:\n    ctx.touch(rhs, _operand_touch",
     "dot_general: kernel touched only if the kernel itself has a mask", T_RULES),
    # -- rules/structural.py
    (RULES + "structural.py", "  return _one(eqn, invals[0], lambda m: m.transpose(perm + [r]),",
     "  return _one(eqn, invals[0], lambda m: m.transpose(inv + [r]),",
     "transpose forward with the inverted permutation", T_RULES),
    (RULES + "structural.py", "              lambda t: M.lift(t, r).transpose(inv + [r]))",
     "              lambda t: M.lift(t, r).transpose(perm + [r]))",
     "transpose provenance pullback with the forward permutation", T_RULES),
    (RULES + "structural.py", "  ones = [d for i, d in enumerate(bd) if in_shape[i] == 1]",
     "  ones = []", "broadcast_in_dim pullback: size-1 axes not ORed", T_RULES),
    (RULES + "structural.py", "                lambda t: reshape_mask(t, out_shape, tshape).transpose(inv + [x.ndim]))",
     "                lambda t: reshape_mask(t, out_shape, tshape).transpose(dims + [x.ndim]))",
     "reshape(dimensions) pullback with the forward permutation", T_RULES),
    (RULES + "structural.py", "    if all(m.shape[a] == 1 for a in gi):", "    if any(m.shape[a] == 1 for a in gi):",
     "reshape_mask: a group kept compressed when any (not all) axis is", T_RULES),
    # -- rules/reductions.py
    (RULES + "reductions.py", "  parts = [M.reduce_or(M.lift(v.mask, v.ndim), axes) for v in data]",
     "  parts = [M.reduce_or(M.lift(v.mask, v.ndim), axes[:1]) for v in data]",
     "reduce: only the first reduced axis ORed", T_RULES),
    (RULES + "reductions.py", "  pull = cut_pull([(x, lambda t: _cum_or(M.lift(t, x.ndim), axis, not reverse))], mask)",
     "  pull = cut_pull([(x, lambda t: _cum_or(M.lift(t, x.ndim), axis, reverse))], mask)",
     "cumulative pullback in the forward direction", T_RULES),
    (RULES + "reductions.py", "  mask = None if x.mask is None else _cum_or(M.lift(x.mask, x.ndim), axis, reverse)",
     "  mask = None if x.mask is None else _cum_or(M.lift(x.mask, x.ndim), axis, False)",
     "cumulative ignores reverse", T_RULES),
    (RULES + "reductions.py", "  keys = M.orr(*(M.reduce_or(M.lift(v.mask, v.ndim), [d], keepdims=True) for v in invals[:nk]))",
     "  keys = M.orr(*(M.reduce_or(M.lift(v.mask, v.ndim), [-1], keepdims=True) for v in invals[:nk]))",
     "sort: keys ORed along the last axis, not `dimension`", T_RULES),
    (RULES + "reductions.py", "    own = M.reduce_or(M.lift(v.mask, v.ndim), [d], keepdims=True)",
     "    own = M.lift(v.mask, v.ndim)", "sort: an operand's own mask not mixed along `dimension`", T_RULES),
    (RULES + "reductions.py", "  axis = eqn.params.get(\"axis\", -1) % x.ndim", "  axis = x.ndim - 1",
     "top_k ignores its axis", T_RULES),
    (RULES + "reductions.py", "    return m.shape[a] > 1 or tuple(padding[a]) != (0, 0) or base_dilation[a] != 1",
     "    return m.shape[a] > 1 or base_dilation[a] != 1",
     "window_or: padding of a constant axis ignored", T_RULES),
    # -- rules/elementwise.py
    (RULES + "elementwise.py", "      partners = M.orr(*(m for j, m in enumerate(masks) if j != i))",
     "      partners = M.orr(*(m for j, m in enumerate(masks) if j == i))",
     "nary: an operand touched by its own mask instead of its partners'", T_RULES),
    (RULES + "elementwise.py", "  out_mask = M.orr(*masks)", "  out_mask = M.orr(*masks[:2])",
     "nary: third and later operands dropped from the OR", T_RULES),
    # -- rules/indexing.py
    (RULES + "indexing.py", "    t = t.transpose(src + others + [rank])", "    t = t.transpose(others + src + [rank])",
     "indexing: axes of a touch put back in the wrong order", T_RULES),
    # -- rules/control_flow.py
    (RULES + "control_flow.py", "  steps = m if reverse else m[::-1]  # steps in reverse order of execution",
     "  steps = m[::-1] if reverse else m  # steps in reverse order of execution",
     "scan: xs suffix OR in the wrong time direction", T_RULES),
    (RULES + "control_flow.py", "    return self.length - 1 - s if self.reverse else s",
     "    return s", "scan: reverse scans read time forwards", T_RULES),
    (RULES + "control_flow.py", "          t[self.row(steps[~read])] = 0",
     "          t[steps[~read]] = 0", "scan xs pullback: other steps by index, not by time row", T_RULES),
    (RULES + "control_flow.py", "      if all(same_mask(c.mask, m) for c, m in zip(cur, _joined(cur, later, later_extra))):",
     "      if True:", "scan: a level steady on its own step taken as steady for every later step", T_SCAN),
    (RULES + "control_flow.py", "          read = steps >= k if later else steps == k",
     "          read = steps >= k", "scan xs pullback: a per-step read touches every later step", T_SCAN),
    (RULES + "control_flow.py", "    mask = by_step[::-1] if reverse else by_step",
     "    mask = by_step", "scan ys of a reverse scan not flipped back", T_RULES),
    (RULES + "control_flow.py", "    if length is not None and k + 1 >= length:",
     "    if length is not None and k + 1 >= min(length, 2):", "loops: fixed point cut after two levels", T_RULES),
    (RULES + "control_flow.py", "    words = M.reduce_all(pred.mask)  # the trip count depends on the predicate",
     "    words = None  # the trip count depends on the predicate", "while: the predicate's mask dropped", T_RULES),
    (RULES + "control_flow.py", "  return [M.orr(c.mask, M.lift(o.mask, c.ndim), M.uniform(extra, c.ndim)) for c, o in zip(cur, outs)]",
     "  return [M.orr(M.lift(o.mask, c.ndim), M.uniform(extra, c.ndim)) for c, o in zip(cur, outs)]",
     "loops: a level not joined with the level below", T_RULES),
    (RULES + "control_flow.py", "    which = np.repeat(np.arange(len(masks)), np.subtract(ends, firsts))  # piece per step",
     "    which = np.repeat(np.arange(len(masks)), np.subtract(ends, firsts))[::-1]  # piece per step",
     "scan: ys steps matched to iterations backwards", T_RULES),
    (RULES + "control_flow.py", "    outs = sc.run(k, carry, later=True, dry=not sc.alike_from(k))",
     "    outs = sc.run(k, carry, later=True, dry=True)",
     "scan: the confirming run is dry even where it stands for the later steps", T_SCAN),
    (RULES + "control_flow.py", "    pieces.append((s, sc.run(s, carry, later=False)[sc.ncarry:]))",
     "    pieces.append((s, sc.run(s, carry, later=False, dry=True)[sc.ncarry:]))",
     "scan: the per-step runs after the steady level record no contacts", T_SCAN),
    (RULES + "control_flow.py", "  if sc.alike_from(k):\n    return [(k, later)]",
     "  if True:\n    return [(k, later)]", "scan: after the steady level, one run reads every later step", T_SCAN),
    # -- core/masks.py
    (  "jaxsurgery/_src/core/masks.py", "  axes = tuple(sorted(a % r for a in axes))\n  big = [a for a in axes if mask.shape[a] > 1]",
     "  axes = tuple(sorted(a % r for a in axes))\n  big = [a for a in axes if mask.shape[a] > 1][:1]",
     "reduce_or: only the first non-trivial axis ORed", T_RULES),
    ("jaxsurgery/_src/core/masks.py", "    if n % 2:  # fold the middle entry into the first",
     "    if False:  # fold the middle entry into the first", "_or_axis halving drops the middle entry", T_RULES),
    ("jaxsurgery/_src/core/masks.py", "    if (mask == first).all():", "    if (mask == first).any():",
     "compress: any instead of all", T_RULES),
    # -- core/interpreter.py
    ("jaxsurgery/_src/core/interpreter.py", "      elif not np.bitwise_and(t, np.bitwise_not(old)).any():",
     "      elif not np.bitwise_and(t, old).any():", "touch: 'nothing new' tested against the wrong bits", T_RULES),
    # -- surgery/relations
    (REL + "views.py", "  return [_moved(S, eqn, x, [x.maps[p] for p in perm], [x.slab[p] for p in perm], perm, old=old)]",
     "  return [_moved(S, eqn, x, [x.maps[perm.index(a)] for a in range(len(perm))], "
     "[x.slab[perm.index(a)] for a in range(len(perm))], perm, old=old)]",
     "planner: an axis followed through a transpose with the inverted permutation", T_PLAN),
    (REL + "pullback.py", "    return [(0, (\"slab\", eqn.params[\"permutation\"][a]))]",
     "    return [(0, (\"slab\", list(eqn.params[\"permutation\"]).index(a)))]",
     "pull-back through a transpose with the inverted permutation", T_PLAN),
    (REL + "pullback.py", "_VIEWS = frozenset({\"transpose\", \"broadcast_in_dim\", \"reshape\", ",
     "_VIEWS = frozenset({\"transpose\", \"broadcast_in_dim\", ", "pull-back: reshape no longer carries zeros", T_PLAN),
    (REL + "contract.py", "  for j, side, axis in ((1, rhs, b), (0, lhs, a)):\n    if side.origin",
     "  for j, side, axis in ((0, lhs, a), (1, rhs, b)):\n    if side.origin",
     "random in, zero out: lhs preferred over the kernel", T_PLAN),
    (REL + "contract.py", "  if NONFIN in (kl, kr):  # 0 * inf", "  if False:  # 0 * inf",
     "contraction: a zero times a non-finite taken as zero", T_PLAN),
    (REL + "views.py", "join(x.slab[a], pad_kind) if (src < 0).any() else pad_kind",
     "join(x.slab[a], pad_kind)", "pad: the operand's slab joined where it has no new positions", T_PLAN),
    (REL + "elementwise.py", "  if k is None or k >= len(ins)", "  if True or k >= len(ins)",
     "partial ops on fresh values: no domain assumption stated", T_PLAN),
    (REL + "driver.py", "  slab = tuple(MEAN if a in meaned else ZERO if a in zeroed else NOVEL for a in range(len(shape)))",
     "  slab = tuple(MEAN if a in meaned else NOVEL for a in range(len(shape)))",
     "driver: zero decisions on a parameter's axes dropped", T_PLAN),
    (REL + "elementwise.py", "  if np.any(vn[zero] != 0):\n    return None", "  if False:\n    return None",
     "const_ratio: a nonzero over an old zero accepted", T_PLAN),
    # -- surgery/plan.py, match.py
    (SUR + "plan.py", "    z = _column(m < 0, a, len(shape))", "    z = _column(m >= 0, a, len(shape))",
     "plan: the old positions zeroed instead of the new ones", T_PLAN),
    (SUR + "plan.py", "    zero = z if zero is None else (zero | z)", "    zero = z if zero is None else (zero & z)",
     "plan: zeroed axes intersected instead of joined", T_PLAN),
    (SUR + "match.py", "    d[i, j] = np.minimum(np.minimum(d[i - 1, j], d[i, j - 1]) + _SKIP, d[i - 1, j - 1] + cost[i - 1, j - 1])",
     "    d[i, j] = np.minimum(np.minimum(d[i - 1, j], d[i, j - 1]), d[i - 1, j - 1] + cost[i - 1, j - 1])",
     "match: skipping a leaf costs nothing", T_PLAN),
    # -- surgery/verify.py
    (SUR + "verify.py", "  return Verification(all(d <= atol for d in worst.values()), worst, atol, samples)",
     "  return Verification(any(d <= atol for d in worst.values()), worst, atol, samples)",
     "verify: ok when any output (not all) agrees", T_PLAN),
    (SUR + "verify.py", "  same = (a == b) | (np.isnan(a) & np.isnan(b))", "  same = (a == b) | (np.isnan(a) | np.isnan(b))",
     "verify: a NaN on one side passes as no difference", T_PLAN),
    (SUR + "verify.py", "      worst[name] = max(worst.get(name, 0.0), _max_diff(a, b))",
     "      worst[name] = _max_diff(a, b)", "verify: only the last sample counts", T_PLAN),
    # -- surgery/state.py
    (SUR + "state.py", "  if dtype == param_dtype:", "  if dtype != param_dtype:",
     "remap_state: a state leaf of another dtype taken as a parameter image", T_STATE),
]


# Why a mutant is known to survive (written next to it in the report).
NOTES: dict[str, str] = {}


def run(cmd, **kw):
  return subprocess.run(cmd, capture_output=True, text=True, **kw)


def check_mutants() -> None:
  for i, (path, orig, repl, desc, _) in enumerate(MUTANTS):
    src = open(os.path.join(REPO, path)).read()
    n = src.count(orig)
    if n != 1:
      raise SystemExit(f"mutant {i} ({desc}): the original text occurs {n} times in {path}")
    if orig == repl:
      raise SystemExit(f"mutant {i}: no change")


def make_worktree() -> None:
  if os.path.exists(WT):
    run(["git", "-C", REPO, "worktree", "remove", "--force", WT])
  r = run(["git", "-C", REPO, "worktree", "add", "--detach", WT, "HEAD"])
  if r.returncode:
    raise SystemExit(r.stderr)
  # the tests of the working copy (new tests not yet committed are run too)
  for f in sorted({f for m in MUTANTS for f in m[4]}):
    subprocess.run(["cp", os.path.join(REPO, f), os.path.join(WT, f)], check=True)
  subprocess.run(["cp", os.path.join(REPO, "tests/checks.py"), os.path.join(WT, "tests/checks.py")], check=True)


def env() -> dict:
  e = dict(os.environ, PYTHONPATH=WT, JAX_PLATFORMS="cpu")
  e.pop("PYTEST_ADDOPTS", None)
  return e


def imported_from_worktree() -> bool:
  r = run([sys.executable, "-c", "import jaxsurgery; print(jaxsurgery.__file__)"], cwd=WT, env=env())
  return r.stdout.strip().startswith(WT)


def run_mutant(i: int, timeout: float, quick: bool) -> dict:
  path, orig, repl, desc, tests = MUTANTS[i]
  target = os.path.join(WT, path)
  src = open(target).read()
  open(target, "w").write(src.replace(orig, repl, 1))
  t0 = time.time()
  status, detail, stage = "survived", "", 0
  try:
    # stage 1: the targeted tests; stage 2 (survivors only): the mutant's wider subset
    stages = [["tests/test_mutants.py"]] + ([] if quick else [[t for t in tests if t != "tests/test_mutants.py"]])
    for k, files in enumerate(stages, 1):
      stage = k
      try:
        r = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files], cwd=WT, env=env(),
                timeout=timeout)
      except subprocess.TimeoutExpired:
        status, detail = "killed", f"timeout after {timeout:.0f} s"
        break
      out = r.stdout.strip().splitlines()
      failed = [line for line in out if line.startswith(("FAILED", "ERROR"))]
      detail = failed[0] if failed else (out[-1] if out else r.stderr[-300:])
      if r.returncode != 0:
        status = "killed"
        break
  finally:
    run(["git", "-C", WT, "checkout", "--", path])
  note = NOTES.get(desc, "") if status == "survived" else ""
  return dict(id=i, file=path, description=desc, status=status, note=note, seconds=round(time.time() - t0, 1),
              detail=detail[:300], stage=stage, tests=tests)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", type=int, action="append", help="run mutant N (repeatable)")
  ap.add_argument("--list", action="store_true", help="list the mutants and exit")
  ap.add_argument("--timeout", type=float, default=240.0, help="seconds per mutant (a timeout counts as killed)")
  ap.add_argument("--quick", action="store_true", help="stage 1 only (tests/test_mutants.py)")
  ap.add_argument("--keep", action="store_true", help="keep the worktree at /tmp/mut_wt")
  ap.add_argument("--report", default=os.path.join(REPO, "scripts", "mutants_report.json"))
  args = ap.parse_args()
  check_mutants()
  if args.list:
    for i, (path, _, _, desc, _tests) in enumerate(MUTANTS):
      print(f"{i:3d}  {path.replace('jaxsurgery/_src/', ''):32s} {desc}")
    return
  ids = args.only if args.only else list(range(len(MUTANTS)))
  make_worktree()
  try:
    if not imported_from_worktree():
      raise SystemExit(f"jaxsurgery is not imported from {WT}: the mutants would not be tested")
    results = []
    for i in ids:
      res = run_mutant(i, args.timeout, args.quick)
      results.append(res)
      print(f"{i:3d} {res['status']:9s} stage {res['stage']} {res['seconds']:6.1f}s  {res['description']}", flush=True)
  finally:
    if not args.keep:
      run(["git", "-C", REPO, "worktree", "remove", "--force", WT])
  killed = sum(r["status"] == "killed" for r in results)
  print(f"\nscore: {killed}/{len(results)} killed")
  for r in results:
    if r["status"] == "survived":
      print(f"  survived {r['id']:3d}: {r['file']}: {r['description']}")
  old = {}
  if args.only and os.path.exists(args.report):
    old = {r["id"]: r for r in json.load(open(args.report)).get("results", [])}
  old.update({r["id"]: r for r in results})
  merged = [old[k] for k in sorted(old)]
  with open(args.report, "w") as f:
    json.dump(dict(total=len(merged), killed=sum(r["status"] == "killed" for r in merged), results=merged), f,
              indent=1)


if __name__ == "__main__":
  main()
