"""``python -m jaxsurgery``: apply a saved plan to a directory of orbax checkpoints (an opponent pool).

  python -m jaxsurgery apply PLAN OLD_DIR NEW_DIR --init INIT [--steps 100,200-400] [--item NAME]
  python -m jaxsurgery show PLAN

``apply`` remaps every step of a ``CheckpointManager`` directory (or the steps
given) into NEW_DIR with the same layout: the item holding the training state
goes through the plan (``jaxsurgery.orbax.restore``), the step's other files
and items are copied. Each step is written into ``NEW_DIR/.jaxsurgery-tmp``
and renamed into place when complete, so a crash never leaves a half-written
step; a rerun skips the steps already written (by the same plan) and clears
what a crash left. OLD_DIR is only read. A step that does not fit the plan
(another model, a corrupt or partial checkpoint) is reported with its step
and path, the others go on, and the exit status is 1.

INIT is the new model's initialised training state, which fresh elements take
their values from: an orbax checkpoint directory (a ``StandardCheckpointer``
item, or a ``CheckpointManager`` root: its latest step) or ``module:function``
(a function of no arguments returning it; ``path/to/file.py:function`` works
too).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxsurgery._src import progress

REPORT = "jaxsurgery.json"     # written in every new step directory
TMP = ".jaxsurgery-tmp"        # where steps are written before they are renamed into place
_PARTIAL = re.compile(r".*\.orbax-checkpoint-tmp-\d+$")


class CliError(Exception):
  """Bad arguments or directories: reported without a traceback, exit status 2."""


# -- arguments ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxsurgery", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("apply", help="apply a saved plan to every checkpoint of a directory",
                     description="Apply a saved plan (Surgery.save) to the orbax checkpoints in OLD_DIR, writing "
                                 "the new checkpoints to NEW_DIR.")
  a.add_argument("plan", help="the plan's directory (written by Surgery.save)")
  a.add_argument("old_dir", help="a CheckpointManager directory of the old model (only read)")
  a.add_argument("new_dir", help="where the new checkpoints go (created; steps already there are skipped)")
  a.add_argument("--init", required=True,
                 help="the new model's initialised state: an orbax checkpoint directory or module:function")
  a.add_argument("--steps", help="the steps to remap, e.g. 100,200,300-500 (default: all)")
  a.add_argument("--item", help="the item of each step that holds the state (default: the only one)")
  a.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                 help="an old state prefix that moved (see jaxsurgery.remap_state); repeatable")
  a.add_argument("--prefixes", action="append", default=None, metavar="PREFIX",
                 help="a new state prefix holding param-shaped subtrees; repeatable (default: found by path)")
  a.add_argument("--strict", action="store_true", help="fail a step if anything is left behind or missing")
  a.add_argument("--fail-fast", action="store_true", help="stop at the first step that fails")
  a.add_argument("--no-progress", action="store_true", help="no progress bar")
  s = sub.add_parser("show", help="print a saved plan's report")
  s.add_argument("plan")
  return p


def _parse_steps(text: str | None, available: Sequence[int]) -> list[int]:
  if text is None:
    return sorted(available)
  wanted: set[int] = set()
  for part in text.split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise CliError(f"--steps: {part!r} is not a step or a range (e.g. 100,200-400).")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    got = {s for s in available if lo <= s <= hi}
    if not got:
      raise CliError(f"--steps: no step {part} in OLD_DIR; its steps are {_ranges(available)}.")
    wanted |= got
  return sorted(wanted)


def _ranges(steps: Sequence[int]) -> str:
  steps = sorted(steps)
  return ", ".join(map(str, steps[:12])) + (f" ... ({len(steps)} steps)" if len(steps) > 12 else "") or "none"


def _rename(pairs: Sequence[str]) -> dict[str, str] | None:
  out = {}
  for p in pairs:
    old, sep, new = p.partition("=")
    if not sep:
      raise CliError(f"--rename {p!r}: expected OLD=NEW (state prefixes, e.g. opt_state=opt_state/1).")
    out[old] = new
  return out or None


# -- directories ----------------------------------------------------------------------------------

def _check_dirs(old_dir: str, new_dir: str) -> None:
  if not os.path.isdir(old_dir):
    raise CliError(f"OLD_DIR {old_dir!r} is not a directory.")
  old, new = os.path.realpath(old_dir), os.path.realpath(new_dir)
  if old == new or new.startswith(old + os.sep) or old.startswith(new + os.sep):
    raise CliError(f"NEW_DIR {new_dir!r} must not be OLD_DIR {old_dir!r}, inside it, or around it: OLD_DIR is "
                   f"never written to.")


def _scan(old_dir: str) -> tuple[dict[int, str], list[str]]:
  """``({step: step directory}, [unfinished saves])`` of a CheckpointManager directory."""
  steps: dict[int, str] = {}
  partial = []
  for name in sorted(os.listdir(old_dir)):
    full = os.path.join(old_dir, name)
    if not os.path.isdir(full):
      continue
    if _PARTIAL.fullmatch(name):
      partial.append(full)
      continue
    m = re.fullmatch(r"(?:.*_)?(\d+)", name)
    if m:
      if int(m.group(1)) in steps:
        raise CliError(f"OLD_DIR has two directories for step {int(m.group(1))}: {steps[int(m.group(1))]!r} and "
                       f"{full!r}; pass --steps to choose others, or move one away.")
      steps[int(m.group(1))] = full
  return steps, partial


def _item_dir(step_dir: str, item: str | None) -> str:
  """The directory of the state item in a step (the step directory itself for a bare checkpoint)."""
  from jaxsurgery._src.integrations.orbax import _is_item_dir
  if _is_item_dir(step_dir):
    return step_dir
  items = sorted(n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n)))
  if item is not None:
    if item not in items:
      raise _StepError(f"has no item {item!r} (items: {items})")
    chosen = item
  elif len(items) == 1:
    chosen = items[0]
  else:
    raise _StepError(f"holds the items {items}; pass --item to say which holds the state")
  path = os.path.join(step_dir, chosen)
  if not _is_item_dir(path):
    raise _StepError(f"item {chosen!r} has no _METADATA: a partial or corrupt checkpoint (an interrupted save?)")
  return path


# -- the new state's init ---------------------------------------------------------------------------

def load_init(spec: str) -> Any:
  """The new model's initialised state, from a checkpoint directory or ``module:function``."""
  if os.path.isdir(spec):
    import orbax.checkpoint as ocp

    from jaxsurgery._src.integrations.orbax import _Source, old_abstract
    src = _Source(spec, None, None)
    with ocp.StandardCheckpointer() as ckpt:
      return ckpt.restore(src.path, old_abstract(src.path))
  module, sep, fn = spec.rpartition(":")
  if not sep or not module or not fn:
    raise CliError(f"--init {spec!r}: not a directory, nor module:function.")
  try:
    if module.endswith(".py"):
      loaded = importlib.util.spec_from_file_location("_jaxsurgery_init", module)
      if loaded is None or loaded.loader is None:
        raise ImportError(f"cannot load {module!r}")
      mod = importlib.util.module_from_spec(loaded)
      loaded.loader.exec_module(mod)
    else:
      mod = importlib.import_module(module)
    make: Callable[[], Any] = getattr(mod, fn)
  except (ImportError, AttributeError, FileNotFoundError) as e:
    raise CliError(f"--init {spec!r}: {type(e).__name__}: {e}") from e
  return make()


# -- one step ----------------------------------------------------------------------------------------

class _StepError(Exception):
  """A step that cannot be remapped; the message completes 'step N (path) ...'."""


@dataclasses.dataclass
class Options:
  """What ``apply`` was asked to do."""
  rename: dict[str, str] | None = None
  prefixes: list[str] | None = None
  strict: bool = False
  item: str | None = None


def _step_summary(step: int, report, dest: str) -> str:
  t = report.totals()
  fresh = sum(s.elements["fresh"] for s in report.subtrees if s.role == "param")
  return (f"step {step}: {len(report.leaves)} leaves -- {t['remapped']} remapped, {t['copied']} copied, "
          f"{t['fresh'] + t['missing'] + t['reset'] + t['init']} from the new init; {t['left_behind']} old leaves "
          f"left behind; {fresh:,} fresh param elements -> {dest}")


def _report_json(step: int, plan_id: str, old_step: str, report) -> dict:
  return {"step": step, "plan_id": plan_id, "old": os.path.abspath(old_step), "totals": report.totals(),
          "from_init": report.from_init, "left_behind": [list(map(str, x)) for x in report.left_behind],
          "subtrees": {s.prefix: {"role": s.role, "old_prefix": s.old_prefix, **s.counts} for s in report.subtrees}}


def _write_step(surgery, plan_id: str, step: int, old_step: str, new_dir: str, init, opts: Options) -> str:
  """Remaps one step into ``NEW_DIR/.jaxsurgery-tmp/<name>`` and renames it into place; returns the summary."""
  import orbax.checkpoint as ocp

  from jaxsurgery._src.integrations.orbax import restore
  name = os.path.basename(old_step)
  tmp = os.path.join(new_dir, TMP, name)
  shutil.rmtree(tmp, ignore_errors=True)
  item = _item_dir(old_step, opts.item)
  state, report = restore(surgery, item, init, rename=opts.rename, prefixes=opts.prefixes, strict=opts.strict,
                          return_report=True)
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  if item == old_step:   # a bare checkpoint: the step directory is the item
    target = tmp
  else:
    os.makedirs(tmp)
    for entry in os.listdir(old_step):   # the step's other items and files, as they are
      src = os.path.join(old_step, entry)
      if src != item:
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, entry))
    target = os.path.join(tmp, os.path.basename(item))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(target), state)
    ckpt.wait_until_finished()
  with open(os.path.join(tmp, REPORT), "w") as f:
    json.dump(_report_json(step, plan_id, old_step, report), f, indent=1)
  dest = os.path.join(new_dir, name)
  os.rename(tmp, dest)   # atomic: the step appears complete or not at all
  return _step_summary(step, report, dest)


def _done(dest: str, plan_id: str) -> bool:
  """The step is already in NEW_DIR, written by this plan (another plan's step is an error)."""
  if not os.path.exists(dest):
    return False
  try:
    with open(os.path.join(dest, REPORT)) as f:
      written = json.load(f).get("plan_id")
  except (OSError, json.JSONDecodeError):
    raise _StepError(f"exists in NEW_DIR ({dest!r}) but was not written by `python -m jaxsurgery apply` (no "
                     f"readable {REPORT}); move it away or choose another NEW_DIR") from None
  if written != plan_id:
    raise _StepError(f"exists in NEW_DIR ({dest!r}), written by another plan ({written}, this one is {plan_id}); "
                     f"use another NEW_DIR")
  return True


# -- commands ----------------------------------------------------------------------------------------

def _progress(steps, enabled: bool):
  return progress.bar(steps, desc="steps", unit="step", enabled=enabled)


def apply(plan: str, old_dir: str, new_dir: str, init_spec: str, steps: str | None = None,
          opts: Options | None = None, progress: bool = True, fail_fast: bool = False, out=None) -> int:
  """The ``apply`` command; returns the exit status (0: all done, 1: some steps failed)."""
  from jaxsurgery._src.surgery import persist
  out = out or sys.stdout
  opts = opts or Options()
  surgery = persist.load(plan)
  plan_id = persist.fingerprint(surgery)
  _check_dirs(old_dir, new_dir)
  available, partial = _scan(old_dir)
  for p in partial:
    print(f"note: {p!r} is an unfinished orbax save (not a step); it is ignored", file=out)
  if not available:
    raise CliError(f"OLD_DIR {old_dir!r} has no step directories (named <step> or <prefix>_<step>).")
  chosen = _parse_steps(steps, list(available))
  os.makedirs(new_dir, exist_ok=True)
  shutil.rmtree(os.path.join(new_dir, TMP), ignore_errors=True)   # what an interrupted run left
  init = load_init(init_spec)
  failed, written, skipped = [], 0, 0
  for step in _progress(chosen, progress):
    old_step = available[step]
    try:
      if _done(os.path.join(new_dir, os.path.basename(old_step)), plan_id):
        skipped += 1
        print(f"step {step}: already in NEW_DIR, skipped", file=out)
        continue
      print(_write_step(surgery, plan_id, step, old_step, new_dir, init, opts), file=out)
      written += 1
    except Exception as e:  # one bad step (wrong model, corrupt data) must not stop the pool
      shutil.rmtree(os.path.join(new_dir, TMP, os.path.basename(old_step)), ignore_errors=True)
      failed.append(step)
      print(f"error: step {step} ({old_step}): {_message(e)}", file=out)
      if fail_fast:
        break
  shutil.rmtree(os.path.join(new_dir, TMP), ignore_errors=True)
  print(f"{written} written, {skipped} already done, {len(failed)} failed" +
        (f" (steps {_ranges(failed)})" if failed else ""), file=out)
  return 1 if failed else 0


def _message(e: Exception) -> str:
  text = str(e) if isinstance(e, _StepError | ValueError | FileNotFoundError) else f"{type(e).__name__}: {e}"
  return text


def show(plan: str, out=None) -> int:
  """The ``show`` command: the plan's id, where it came from, and its report."""
  from jaxsurgery._src.surgery import persist
  out = out or sys.stdout
  manifest = persist.read_manifest(plan)
  surgery = persist.load(plan)
  print(f"plan {manifest['plan_id']} (format {manifest['version']}, written by jaxsurgery {manifest['jaxsurgery']})",
        file=out)
  print(repr(surgery.report), file=out)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  args = _parser().parse_args(argv)
  try:
    if args.command == "show":
      return show(args.plan)
    opts = Options(rename=_rename(args.rename), prefixes=args.prefixes, strict=args.strict, item=args.item)
    return apply(args.plan, args.old_dir, args.new_dir, args.init, args.steps, opts, progress=not args.no_progress,
                 fail_fast=args.fail_fast)
  except (CliError, FileNotFoundError, ValueError) as e:   # the plan, the directories, the arguments
    print(f"error: {e}", file=sys.stderr)
    return 2
