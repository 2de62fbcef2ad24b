"""What surgery buys: four training runs on a task where a new input feature carries information.

  python benchmarks/bench_training.py             # 5 seeds, writes results/training.json, training.png
  python benchmarks/bench_training.py --quick     # 1 seed, short runs (a smoke test of the script)
  python benchmarks/bench_training.py --replot    # redraw training.png from results/training.json
  python benchmarks/bench_training.py --widen head   # widen the head MLP instead of the LSTM

The task and model are in `training_task.py`. Per seed, all runs see the same batch at the same step:
  A  the old model (features [a, b]), trained `pretrain` steps, then `after` steps more;
  B  A at step `pretrain`, then surgery: feature c inserted and a layer widened
     (`js.plan` + `surgery(old, new_init)`, optimizer state by `carry_optimizer_state`), continued;
  C  the new model from scratch, `pretrain + after` steps;
  D  A at step `pretrain`, transferred naively: every leaf of the training state (params and
     optimizer state) whose path and shape are unchanged is copied, every other leaf is the new
     init (what `strict=False` loaders and `ignore_mismatched_sizes` do), continued.
Loss curves are the loss on a fixed held-out set of sequences, after each number of updates.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
import training_task as task

import jaxsurgery as js


@dataclasses.dataclass(frozen=True)
class Config:
  seeds: int = 5
  pretrain: int = 1500           # N: steps of A before the surgery
  after: int = 2000              # steps after the surgery (A, B, D); C runs pretrain + after
  batch: int = 64
  seq_len: int = 16
  lr: float = 1e-3
  eval_every: int = 25
  eval_size: int = 1024
  zoom: tuple[int, int] = (-10, 60)   # dense evaluation (every step) around the surgery
  widen: str = "lstm"            # the layer the surgery widens: "lstm" (32 -> 48 units) or "head"

  def shapes(self):
    old = task.Shape(len(task.OLD_FEATURES))
    wider = {"lstm": {"hidden": 48}, "head": {"head": 64}}[self.widen]
    return old, task.Shape(len(task.NEW_FEATURES), **wider)


# -- the optimizer state after surgery: the one place to switch to an exact carry-over -----

def carry_optimizer_state(surgery, old_opt_state, new_opt_state_init):
  """The new model's optimizer state, from the old one.

  `js.remap_state` with `js.optim.adam`: moments follow their parameter elements, and each
  element has its own step count, so fresh elements restart at 0 and their first update is a
  fresh Adam's (about lr), not lr (1 - b1) / sqrt((1 - b2) / (1 - b2^t)) (2.8 x lr at t = 1500)
  as with optax.adam's one shared count (issue 11, section 1). `update_sizes` measures it.
  """
  return js.remap_state(surgery, old_opt_state, new_opt_state_init, return_report=True)


def naive_transfer(old_tree, new_tree_init):
  """Run D: copy every leaf whose path, shape and dtype are unchanged; the rest is the new init."""
  old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(old_tree)[0]}
  copied = []

  def pick(path, new):
    key = jax.tree_util.keystr(path)
    src = old.get(key)
    if src is not None and src.shape == new.shape and src.dtype == new.dtype:
      copied.append(key)
      return src
    return new
  return jax.tree_util.tree_map_with_path(pick, new_tree_init), copied


# -- training -----------------------------------------------------------------------------

class Trainer:
  """Jitted train step and evaluation for one model (feature names and shape)."""

  def __init__(self, cfg: Config, names, shape, tx, eval_data):
    self.cfg, self.names, self.shape, self.tx = cfg, names, shape, tx
    obs, labels = eval_data
    self.eval_x, self.eval_y = task.view(obs, names), labels
    self.step = jax.jit(self._step)
    self.loss = jax.jit(task.loss)
    self.grad = jax.jit(jax.grad(task.loss))
    self.batch = jax.jit(self._batch)
    self._init = jax.jit(lambda key: task.init_params(key, shape))

  def _batch(self, data_key, step):
    obs, labels = task.batch(jax.random.fold_in(data_key, step), self.cfg.batch, self.cfg.seq_len)
    return task.view(obs, self.names), labels

  def _step(self, state, data_key, step):
    xs, labels = self._batch(data_key, step)
    loss, grads = jax.value_and_grad(task.loss)(state["params"], xs, labels)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  def init(self, key):
    params = self._init(key)
    # Committed to the device like the surgery's output, so that both hit one compiled step.
    return jax.device_put({"params": params, "opt_state": self.tx.init(params)}, jax.devices()[0])

  def flops_per_step(self, state, data_key) -> float:
    """XLA's cost analysis of one train step (batch, forward, backward, Adam), before compiling."""
    cost = self.step.lower(state, data_key, 0).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

  def evaluate(self, params) -> float:
    return float(self.loss(params, self.eval_x, self.eval_y))

  def train(self, state, data_key, start: int, stop: int, zoom_at: int | None = None):
    """Steps [start, stop). Returns (state, log): eval loss after each number of updates, the train
    loss of each step (before its update), and the training time so far (evaluation excluded)."""
    log = {"eval_step": [], "eval_loss": [], "train_time": [], "train_loss": []}
    elapsed = 0.0
    jax.block_until_ready(self.step(state, data_key, start))   # compile outside the clock; discarded
    dense = range(zoom_at + self.cfg.zoom[0], zoom_at + self.cfg.zoom[1] + 1) if zoom_at is not None else ()
    for s in range(start, stop + 1):
      if s % self.cfg.eval_every == 0 or s == start or s == stop or s in dense:
        log["eval_step"].append(s)
        log["eval_loss"].append(self.evaluate(state["params"]))
        log["train_time"].append(elapsed)
      if s == stop:
        break
      t = time.perf_counter()
      state, loss = self.step(state, data_key, s)
      log["train_loss"].append(float(loss))       # float() waits for the step: time is real
      elapsed += time.perf_counter() - t
    return state, log


# -- surgery and the measurements around it ------------------------------------------------

def build_surgery(cfg: Config, old_shape, new_shape):
  """Tables from abstract shapes, and the plan. Returns (surgery, seconds)."""
  t = time.perf_counter()
  inputs = lambda n: jax.ShapeDtypeStruct((cfg.batch, cfg.seq_len, n), jnp.float32)
  abstract = lambda shape: jax.eval_shape(lambda: task.init_params(jax.random.key(0), shape))
  old_table = js.dependency_table(task.fn, abstract(old_shape), inputs(old_shape.features),
                                  js.Features(list(task.OLD_FEATURES)))
  new_table = js.dependency_table(task.fn, abstract(new_shape), inputs(new_shape.features),
                                  js.Features(list(task.NEW_FEATURES)))
  surgery = js.plan(old_table, new_table)
  return surgery, time.perf_counter() - t


def element_kinds(surgery, old_params, new_init):
  """Per new leaf, bool masks "old" (carried over), "zeroed" and "fresh" (kept the new init),
  found through the public call: surgery(ones, zeros) marks carried elements, (ones, ones) the
  zeroed ones."""
  @jax.jit
  def kinds(old_params, new_init):
    ones = jax.tree.map(jnp.ones_like, old_params)
    carried = jax.tree.map(lambda x: x != 0, surgery(ones, jax.tree.map(jnp.zeros_like, new_init)))
    nonzero = surgery(ones, jax.tree.map(jnp.ones_like, new_init))
    zeroed = jax.tree.map(lambda c, x: ~c & (x == 0), carried, nonzero)
    fresh = jax.tree.map(lambda c, z: ~c & ~z, carried, zeroed)
    return {"old": carried, "zeroed": zeroed, "fresh": fresh}
  return kinds(old_params, new_init)


@jax.jit
def _update_stats(delta, grads, kinds):
  """Per kind: (elements with a nonzero gradient, sum and max of |update| over them)."""
  out = {}
  for kind, masks in kinds.items():
    sel = jax.tree.map(lambda m, g: m & (g != 0), masks, grads)
    size = jax.tree.map(lambda m, d: jnp.where(m, jnp.abs(d), 0.0), sel, delta)
    out[kind] = (sum(x.sum() for x in jax.tree.leaves(sel)), sum(x.sum() for x in jax.tree.leaves(size)),
                 jnp.max(jnp.stack([x.max() for x in jax.tree.leaves(size)])))
  return out


def update_sizes(trainer, state, data_key, step, kinds, lr):
  """Mean |update| / lr on `step`, per kind of element, over elements whose gradient is nonzero
  (a fresh unit's weights get no gradient while everything reading it is zero). Also returns the
  update itself (new params - params)."""
  grads = trainer.grad(state["params"], *trainer.batch(data_key, step))
  new_state, _ = trainer.step(state, data_key, step)
  delta = jax.tree.map(jnp.subtract, new_state["params"], state["params"])
  out = {}
  for kind, (n, total, biggest) in _update_stats(delta, grads, kinds).items():
    n = int(n)
    out[kind] = {"elements": n, "mean_over_lr": float(total) / n / lr if n else None,
                 "max_over_lr": float(biggest) / lr if n else None}
  return out, delta


def all_old(params):
  none = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
  return {"old": jax.tree.map(lambda x: np.ones(x.shape, bool), params), "zeroed": none, "fresh": none}


@jax.jit
def _continuity(a_params, b_params, xa, xb, labels):
  logits_a, logits_b = task.fn(a_params, xa), task.fn(b_params, xb)
  return task.loss(a_params, xa, labels), task.loss(b_params, xb, labels), jnp.abs(logits_a - logits_b).max()


def continuity(trainers, a_params, b_params, data_key, step):
  """A and B at the surgery step on the same batch: losses and the largest logit difference."""
  old_tr, new_tr = trainers
  xa, ya = old_tr.batch(data_key, step)
  xb, yb = new_tr.batch(data_key, step)
  assert bool((ya == yb).all())
  loss_a, loss_b, diff = _continuity(a_params, b_params, xa, xb, ya)
  return {"loss_a": float(loss_a), "loss_b": float(loss_b), "max_logit_diff": float(diff),
          "eval_loss_a": old_tr.evaluate(a_params), "eval_loss_b": new_tr.evaluate(b_params)}


def old_update_match(surgery, a_delta, b_delta, kinds_b):
  """max |B's update - A's update| over the old elements on the first step after surgery, with A's
  update carried to the new positions by the plan (issue 11, section 1, "old elements")."""
  @jax.jit
  def worst(a_delta, b_delta, old):
    a_moved = surgery(a_delta, jax.tree.map(jnp.zeros_like, b_delta))
    diffs = jax.tree.map(lambda m, a, b: jnp.where(m, jnp.abs(a - b), 0).max(), old, a_moved, b_delta)
    return jnp.max(jnp.stack(jax.tree.leaves(diffs)))
  return float(worst(a_delta, b_delta, kinds_b["old"]))


# -- one seed -----------------------------------------------------------------------------

def run_seed(cfg: Config, seed: int, surgery, trainers):
  old_tr, new_tr = trainers
  data_key = jax.random.key(10_000 + seed)   # every run of this seed sees the same batches
  key_a, key_new = jax.random.split(jax.random.key(seed))
  n, total = cfg.pretrain, cfg.pretrain + cfg.after
  res = {"seed": seed}

  a_at_n, log_a1 = old_tr.train(old_tr.init(key_a), data_key, 0, n)
  _, log_a2 = old_tr.train(a_at_n, data_key, n, total, zoom_at=n)
  res["A"] = join_logs(log_a1, log_a2)

  new_init = new_tr.init(key_new)   # B, C and D share the new model's initial state
  state_b, res["surgery_s"], state_report = surgery_step(surgery, a_at_n, new_init)
  res["verify"] = verify(cfg, surgery, a_at_n["params"], state_b["params"], seed)
  res["continuity"] = continuity(trainers, a_at_n["params"], state_b["params"], data_key, n)
  kinds_b = element_kinds(surgery, a_at_n["params"], new_init["params"])
  res["update_A"], a_delta = update_sizes(old_tr, a_at_n, data_key, n, all_old(a_at_n["params"]), cfg.lr)
  res["update_B"], b_delta = update_sizes(new_tr, state_b, data_key, n, kinds_b, cfg.lr)
  res["old_update_max_diff"] = old_update_match(surgery, a_delta, b_delta, kinds_b)
  # Fresh units get no gradient on that step (everything reading them is zero): their second step.
  b_next, _ = new_tr.step(state_b, data_key, n)
  res["update_B_2nd"], _ = update_sizes(new_tr, b_next, data_key, n + 1, kinds_b, cfg.lr)
  res["update_C"], _ = update_sizes(new_tr, new_init, data_key, 0, all_old(new_init["params"]), cfg.lr)
  _, res["B"] = new_tr.train(state_b, data_key, n, total, zoom_at=n)

  state_d, res["D_copied"] = naive_transfer(a_at_n, new_init)
  kinds_d = naive_kinds(res["D_copied"], new_init["params"])
  res["update_D"], _ = update_sizes(new_tr, state_d, data_key, n, kinds_d, cfg.lr)
  res["continuity_D"] = continuity(trainers, a_at_n["params"], state_d["params"], data_key, n)
  _, res["D"] = new_tr.train(state_d, data_key, n, total, zoom_at=n)

  _, res["C"] = new_tr.train(new_init, data_key, 0, total)
  return res, state_report


def surgery_step(surgery, old_state, new_init):
  """Run B's transfer: params by the plan, optimizer state by `carry_optimizer_state`; timed."""
  t = time.perf_counter()
  params = surgery(old_state["params"], new_init["params"])
  opt_state, state_report = carry_optimizer_state(surgery, old_state["opt_state"], new_init["opt_state"])
  state = jax.block_until_ready({"params": params, "opt_state": opt_state})
  return state, time.perf_counter() - t, state_report


def naive_kinds(copied, params):
  """D's element kinds: "old" for leaves `naive_transfer` copied, "fresh" for the others."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  is_copied = {jax.tree_util.keystr(p): ("['params']" + jax.tree_util.keystr(p)) in copied for p, _ in leaves}
  old = jax.tree_util.tree_map_with_path(
      lambda p, x: np.full(x.shape, is_copied[jax.tree_util.keystr(p)]), params)
  none = jax.tree.map(lambda x: np.zeros(x.shape, bool), params)
  return {"old": old, "zeroed": none, "fresh": jax.tree.map(lambda m: ~m, old)}


def verify(cfg, surgery, old_params, new_params, seed):
  inputs = lambda n: jax.ShapeDtypeStruct((8, cfg.seq_len, n), jnp.float32)
  v = js.verify(surgery, task.fn, task.fn, old_params, new_params, inputs(len(task.OLD_FEATURES)),
                inputs(len(task.NEW_FEATURES)), key=jax.random.key(seed))
  return {"ok": v.ok, "max_abs_diff": v.max_abs_diff, "atol": v.atol}


def join_logs(first, second):
  """A's two segments as one curve (the surgery step appears once) and one clock."""
  t0 = first["train_time"][-1]
  return {"eval_step": first["eval_step"] + second["eval_step"][1:],
          "eval_loss": first["eval_loss"] + second["eval_loss"][1:],
          "train_time": first["train_time"] + [t0 + t for t in second["train_time"][1:]],
          "train_loss": first["train_loss"] + second["train_loss"]}


# -- summary ------------------------------------------------------------------------------

RUNS = ("A", "B", "C", "D")
LEVELS = (1.0, 0.8, 0.6, 0.4, 0.3)   # further loss levels: steps to reach each are reported too


def steps_to(seeds, target, n):
  """Per run, per seed: updates and training seconds until the eval loss <= target (B and D
  counted from the surgery step n)."""
  reach = {r: [first_reach(s[r], target, n if r in "BD" else 0) for s in seeds] for r in RUNS}
  return ({r: [x[0] for x in reach[r]] for r in RUNS}, {r: [x[1] for x in reach[r]] for r in RUNS})


def first_reach(log, target, start):
  """(updates since `start`, training seconds since `start`) when the eval loss first <= target."""
  t0 = log["train_time"][log["eval_step"].index(start)]
  for s, loss, t in zip(log["eval_step"], log["eval_loss"], log["train_time"]):
    if s >= start and loss <= target:
      return s - start, t - t0
  return None, None


def spread(values):
  vals = [v for v in values if v is not None]
  if not vals:
    return {"mean": None, "min": None, "max": None, "n": 0}
  return {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals)), "n": len(vals)}


def final_loss(log, last: int = 4):
  """Mean of the last `last` evaluations (the last 100 steps at eval_every=25)."""
  return float(np.mean(log["eval_loss"][-last:]))


def summarize(cfg: Config, seeds, surgery_build_s, flops):
  n = cfg.pretrain
  finals = {r: [final_loss(s[r]) for s in seeds] for r in RUNS}
  # Target: the worst final loss of any seed of B or C, so that every B and C run reaches it.
  target = max(finals["B"] + finals["C"])
  steps, secs = steps_to(seeds, target, n)
  a_time_n = [s["A"]["train_time"][s["A"]["eval_step"].index(n)] for s in seeds]
  surgery_s = [s["surgery_s"] for s in seeds]
  cont = [s["continuity"] for s in seeds]
  out = {
      "target": {"loss": target, "rule": "the highest final loss of any seed of B or C (final: the mean of "
                 f"the last 4 evaluations, steps {cfg.pretrain + cfg.after - 75}..{cfg.pretrain + cfg.after}), "
                 "so that every B and C run reaches it"},
      "levels": {f"{level:g}": {r: spread(steps_to(seeds, level, n)[0][r]) for r in RUNS} for level in LEVELS},
      "final_loss": {r: spread(finals[r]) for r in RUNS},
      "steps_to_target": {r: spread(steps[r]) for r in RUNS},
      "reached": {r: sum(x is not None for x in steps[r]) for r in RUNS},
      "train_seconds_to_target": {r: spread(secs[r]) for r in RUNS},
      "a_train_seconds_to_surgery": spread(a_time_n),
      "surgery_seconds": spread(surgery_s),
      "plan_seconds": surgery_build_s,
      "flops_per_step": flops,
      "ms_per_step": {r: spread([1e3 * s[r]["train_time"][-1] / len(s[r]["train_loss"]) for s in seeds])
                      for r in RUNS},
      "after_surgery": {
          "loss_A": spread([c["loss_a"] for c in cont]), "loss_B": spread([c["loss_b"] for c in cont]),
          "max_abs_loss_diff_B_A": max(abs(c["loss_b"] - c["loss_a"]) for c in cont),
          "max_logit_diff_B_A": max(c["max_logit_diff"] for c in cont),
          "max_abs_eval_loss_diff_B_A": max(abs(c["eval_loss_b"] - c["eval_loss_a"]) for c in cont),
          "loss_D": spread([s["continuity_D"]["loss_b"] for s in seeds]),
          "jump_D": spread([s["continuity_D"]["loss_b"] - s["continuity_D"]["loss_a"] for s in seeds]),
          "eval_jump_D": spread([s["continuity_D"]["eval_loss_b"] - s["continuity_D"]["eval_loss_a"]
                                 for s in seeds]),
          "verify_ok": all(s["verify"]["ok"] for s in seeds),
          "verify_max_abs_diff": max(max(s["verify"]["max_abs_diff"].values()) for s in seeds),
          "old_update_max_diff_B_A": max(s["old_update_max_diff"] for s in seeds),
      },
      "first_update_over_lr": {
          f"{run}/{kind}": spread([s[f"update_{run}"][kind]["mean_over_lr"] for s in seeds])
          for run, kind in update_kinds(seeds)},
      "first_update_max_over_lr": {
          f"{run}/{kind}": spread([s[f"update_{run}"][kind]["max_over_lr"] for s in seeds])
          for run, kind in update_kinds(seeds)},
      "first_update_elements": {f"{run}/{kind}": seeds[0][f"update_{run}"][kind]["elements"]
                                for run, kind in update_kinds(seeds)},
  }
  out["saved"] = savings(steps, secs, a_time_n, surgery_s, surgery_build_s, n, flops)
  return out


def update_kinds(seeds):
  """(run, kind) pairs that have elements (B's fresh ones always: they have none on B's first step)."""
  runs = ("A", "B", "B_2nd", "C", "D")
  return [(r, k) for r in runs for k, v in seeds[0][f"update_{r}"].items()
          if v["elements"] or (r, k) == ("B", "fresh")]


def savings(steps, secs, a_time_n, surgery_s, build_s, n, flops):
  """What B saves against C to the target, per seed then summarised. (a) The old run exists anyway:
  B pays its steps after surgery, the surgery and the plan. (b) Counted from step 0: B also pays
  A's N steps of the (cheaper) old model. Fractions are of C's cost."""
  rows = []
  for sb, sc, tb, tc, ta, ts in zip(steps["B"], steps["C"], secs["B"], secs["C"], a_time_n, surgery_s):
    if sb is None or sc is None:
      rows.append(None)
      continue
    flops_b, flops_c = sb * flops["new"], sc * flops["new"]
    flops_b0 = flops_b + n * flops["old"]
    rows.append({"steps": sc - sb, "steps_fraction": 1 - sb / sc, "steps_from_zero": sc - (n + sb),
                 "flops_fraction": 1 - flops_b / flops_c, "flops_fraction_from_zero": 1 - flops_b0 / flops_c,
                 "seconds": tc - (tb + ts + build_s), "seconds_fraction": 1 - (tb + ts + build_s) / tc,
                 "seconds_from_zero": tc - (ta + tb + ts + build_s),
                 "seconds_fraction_from_zero": 1 - (ta + tb + ts + build_s) / tc})
  keys = next((r.keys() for r in rows if r), ())
  return {k: spread([r[k] if r else None for r in rows]) for k in keys}


def print_summary(cfg, summary, state_report, surgery):
  a = summary["after_surgery"]
  f = lambda s, p=4: "n/a" if s["mean"] is None else f"{s['mean']:.{p}f} [{s['min']:.{p}f}, {s['max']:.{p}f}]"
  fi = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.0f} [{s['min']:.0f}, {s['max']:.0f}]"
  print(surgery.report)
  print(state_report)
  print(f"\n== {cfg.seeds} seeds, mean [min, max]")
  print(f"after surgery (step {cfg.pretrain}, same batch): loss A {f(a['loss_A'])}, B {f(a['loss_B'])}; "
        f"max |B - A| loss {a['max_abs_loss_diff_B_A']:.2e}, logits {a['max_logit_diff_B_A']:.2e}, "
        f"eval loss {a['max_abs_eval_loss_diff_B_A']:.2e}; report.preserved {surgery.report.preserved}; "
        f"js.verify ok {a['verify_ok']} (max diff {a['verify_max_abs_diff']:.2e})")
  print(f"first update after surgery, old elements: max |B - A| {a['old_update_max_diff_B_A']:.2e}")
  print(f"D (naive) at the surgery step: loss {f(a['loss_D'])}, jump {f(a['jump_D'])} "
        f"(eval loss jump {f(a['eval_jump_D'])})")
  print("mean |update| / lr on the first step after surgery (B_2nd: B's second step; C: C's first step), "
        "over elements with a nonzero gradient:")
  for k, v in summary["first_update_over_lr"].items():
    count = summary["first_update_elements"][k]
    why = "  (fresh units: everything reading them is zero, so no gradient yet; see B_2nd)" if not count else ""
    print(f"  {k:13s} {f(v, 2):24s} ({count:,} elements){why}")
  print(f"target loss {summary['target']['loss']:.4f} ({summary['target']['rule']})")
  for r in RUNS:
    print(f"  {r}: final loss {f(summary['final_loss'][r])}; steps to target "
          f"{fi(summary['steps_to_target'][r])} ({summary['reached'][r]}/{cfg.seeds} reached; B, D counted "
          f"from the surgery); training time {f(summary['train_seconds_to_target'][r], 1)} s")
  print("steps to reach further levels (B, D from the surgery), mean [min, max] over the seeds that do:")
  for level, row in summary["levels"].items():
    print(f"  loss <= {level}: " + "; ".join(f"{r} {fi(row[r])} ({row[r]['n']}/{cfg.seeds})" for r in RUNS))
  s, fl = summary["saved"], summary["flops_per_step"]
  if s:
    print(f"B saves against C, to the target: {fi(s['steps'])} steps ({f(s['steps_fraction'], 2)} of C's), "
          f"{f(s['flops_fraction'], 2)} of C's FLOPs, {f(s['seconds'], 1)} s training time "
          f"({f(s['seconds_fraction'], 2)} of C's; surgery and plan included)")
    print(f"  counted from step 0 (A's {cfg.pretrain} old-model steps included): {fi(s['steps_from_zero'])} "
          f"steps, {f(s['flops_fraction_from_zero'], 2)} of C's FLOPs, {f(s['seconds_from_zero'], 1)} s "
          f"({f(s['seconds_fraction_from_zero'], 2)} of C's time)")
  print(f"FLOPs per train step (XLA cost analysis): old {fl['old'] / 1e6:.1f} M, new {fl['new'] / 1e6:.1f} M; "
        "ms per step: " + ", ".join(f"{r} {f(summary['ms_per_step'][r], 2)}" for r in RUNS))
  print(f"plan (tables + js.plan, once) {summary['plan_seconds']:.2f} s; surgery + optimizer state per seed "
        f"{f(summary['surgery_seconds'], 3)} s")


# -- figure -------------------------------------------------------------------------------

STYLE = {"A": ("tab:gray", "A: old model, continued"),
         "B": ("tab:blue", "B: A + surgery (js.plan), continued"),
         "C": ("tab:orange", "C: new model from scratch"),
         "D": ("tab:red", "D: A + naive copy of same-shape leaves")}


def curves(seeds, run):
  steps = np.asarray(seeds[0][run]["eval_step"])
  losses = np.asarray([s[run]["eval_loss"] for s in seeds])
  return steps, losses.mean(0), losses.min(0), losses.max(0)


def plot(cfg, seeds, summary, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = plt.figure(figsize=(12, 8.5))
  grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
  main, zoom, aligned = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
  n, lo, hi = cfg.pretrain, cfg.pretrain + cfg.zoom[0], cfg.pretrain + cfg.zoom[1]
  target = summary["target"]["loss"]
  for run in RUNS:
    steps, mean, low, high = curves(seeds, run)
    band(main, run, steps, mean, low, high)
    if run != "C":
      keep = (steps >= lo) & (steps <= hi)
      band(zoom, run, steps[keep], mean[keep], low[keep], high[keep])
    if run != "A":
      shift = n if run in "BD" else 0
      band(aligned, run, steps - shift, mean, low, high)
  main.axvline(n, color="k", ls="--", lw=0.8)
  main.text(n, 1.3, " surgery", fontsize=9)
  zoom.axvline(n, color="k", ls="--", lw=0.8)
  after = summary["after_surgery"]
  zoom.text(0.98, 0.97, f"at step {n}, same batch: max |loss B - loss A| = "
            f"{after['max_abs_loss_diff_B_A']:.1e}\nD jumps by {after['jump_D']['mean']:+.2f} "
            f"[{after['jump_D']['min']:+.2f}, {after['jump_D']['max']:+.2f}]", transform=zoom.transAxes,
            ha="right", va="top", fontsize=9)
  for axis in (main, aligned):
    axis.axhline(target, color="k", ls=":", lw=0.8)
    axis.set_yscale("log")
  main.text(0, target, f"target {target:.3f}", va="bottom", fontsize=9)
  main.set(xlabel="training steps (updates)", ylabel="held-out loss (cross-entropy, 4 classes)",
           title=f"all four runs: mean and min/max over {cfg.seeds} seeds")
  main.legend(loc="upper right", bbox_to_anchor=(1.0, 0.8), fontsize=9)
  zoom.set(xlim=(lo, hi), xlabel="training steps", ylabel="held-out loss",
           title=f"zoom at the surgery (step {n}), evaluated every step")
  aligned.set(xlim=(0, cfg.after), xlabel="steps trained as the new model (B, D: since the surgery)",
              ylabel="held-out loss", title="B, C, D on the new model's clock (C: since its init)")
  for axis in (main, zoom, aligned):
    axis.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def band(axis, run, steps, mean, low, high):
  color, label = STYLE[run]
  axis.plot(steps, mean, color=color, label=label, lw=1.5)
  axis.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)


# -- main ---------------------------------------------------------------------------------

def machine() -> dict:
  """The facts run_all.py records, plus optax."""
  import flax
  import jaxlib
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
               platform.processor())
  with open("/proc/meminfo") as f:
    mem = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
  return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": mem / 2**20,
          "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "numpy": np.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "platform": platform.platform(), "backend": jax.default_backend(), "load": os.getloadavg(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"), "jaxsurgery": library_version()}


def library_version() -> dict:
  """Which jaxsurgery ran: its location, the repository's HEAD and whether jaxsurgery/ had edits."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(js.__file__)))
  git = lambda *a: subprocess.run(["git", "-C", root, *a], check=False, capture_output=True,
                                  text=True).stdout.strip()
  return {"path": os.path.dirname(js.__file__), "head": git("rev-parse", "HEAD") or None,
          "uncommitted_changes": bool(git("status", "--porcelain", "--", "jaxsurgery"))}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, default=Config.seeds)
  p.add_argument("--pretrain", type=int, default=Config.pretrain)
  p.add_argument("--after", type=int, default=Config.after)
  p.add_argument("--widen", choices=("lstm", "head"), default=Config.widen)
  p.add_argument("--quick", action="store_true", help="1 seed, 300 + 300 steps; writes training_quick.*")
  p.add_argument("--name", default=None, help="output name (default: training, or training_quick)")
  p.add_argument("--replot", action="store_true", help="only redraw the figure from results/<name>.json")
  args = p.parse_args(argv)
  if args.quick:
    args.seeds, args.pretrain, args.after = 1, 300, 300
  name = args.name or ("training_quick" if args.quick else "training")
  cfg = Config(seeds=args.seeds, pretrain=args.pretrain, after=args.after, widen=args.widen)
  return cfg, name, args.replot


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  cfg, name, replot = parse_args(argv)
  if replot:
    saved = common.load(name)
    cfg = Config(**{**saved["config"], "zoom": tuple(saved["config"]["zoom"])})
    plot(cfg, saved["seeds"], saved["summary"], os.path.join(common.HERE, f"{name}.png"))
    return
  mach, t_start = machine(), time.perf_counter()
  old_shape, new_shape = cfg.shapes()
  surgery, build_s = build_surgery(cfg, old_shape, new_shape)
  tx = js.optim.adam(cfg.lr)   # per-element step counts (optax.adam for the old model is the same)
  eval_data = task.batch(jax.random.key(99), cfg.eval_size, cfg.seq_len)   # the same for every seed
  trainers = (Trainer(cfg, task.OLD_FEATURES, old_shape, tx, eval_data),
              Trainer(cfg, task.NEW_FEATURES, new_shape, tx, eval_data))
  flops = {k: tr.flops_per_step(tr.init(jax.random.key(0)), jax.random.key(0))
           for k, tr in zip(("old", "new"), trainers)}
  seeds, state_report = [], None
  for seed in range(cfg.seeds):
    t = time.perf_counter()
    res, state_report = run_seed(cfg, seed, surgery, trainers)
    seeds.append(res)
    print(f"seed {seed}: {time.perf_counter() - t:.0f} s; final loss "
          + ", ".join(f"{r} {final_loss(res[r]):.4f}" for r in RUNS), flush=True)
  summary = summarize(cfg, seeds, build_s, flops)
  print_summary(cfg, summary, state_report, surgery)
  mach["load_end"], mach["total_s"] = os.getloadavg(), time.perf_counter() - t_start
  figure = os.path.join(common.HERE, f"{name}.png")
  plot(cfg, seeds, summary, figure)
  print(f"total {mach['total_s']:.0f} s; figure {os.path.relpath(figure)}")
  common.save(name, {"command": " ".join(["python benchmarks/bench_training.py", *argv]),
                     "machine": mach, "config": dataclasses.asdict(cfg),
                     "old_shape": dataclasses.asdict(old_shape), "new_shape": dataclasses.asdict(new_shape),
                     "report": {"preserved": surgery.report.preserved, "totals": surgery.report.totals(),
                                "reasons": list(surgery.report.reasons), "text": str(surgery.report)},
                     "state_report": str(state_report), "summary": summary,
                     "seeds": [compact(s) for s in seeds]})


def compact(seed_result):
  """A seed's result for the JSON file: eval curves rounded, per-step train losses left out."""
  out = dict(seed_result)
  for run in RUNS:
    log = seed_result[run]
    out[run] = {"eval_step": log["eval_step"], "eval_loss": [round(x, 6) for x in log["eval_loss"]],
                "train_time": [round(x, 4) for x in log["train_time"]]}
  return out


if __name__ == "__main__":
  main()
