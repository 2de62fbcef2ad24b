"""Subprocess side of tests/test_distributed.py and benchmarks/bench_sharded.py.

jax reads the device count once, when its backend starts, and the test suite runs
with one CPU device. So every check on several devices runs here, in a fresh
process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``:

  python tests/distributed_worker.py check OLD:NEW [OLD:NEW...]    # 8 devices: shardings and values
  python tests/distributed_worker.py memory SCALE LAYOUT...        # 8 devices: compiled memory, no data
  python tests/distributed_worker.py explicit                      # 8 devices: a jax.make_mesh default mesh
  python tests/distributed_worker.py process ID PORT DIR           # one of 2 processes x 4 devices

Each mode prints one JSON line (the last line of stdout); the test asserts on it.
Importing this module only defines the model and the states (no devices are used),
so the test computes its single-device references with the same code.

The model: a 3-layer MLP over named input features. The new model reorders the
8 old features and adds 8 more, and widens both hidden layers (32 -> 48 and
64 -> 80 units, times ``scale``). The state is params plus an optax adam state.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsurgery as js
from jaxsurgery._src.surgery import remap as remap_lib
from jaxsurgery._src.surgery import state as state_lib

OLD_FEATURES = [f"f{i}" for i in range(8)]
NEW_FEATURES = OLD_FEATURES[::-1] + [f"g{i}" for i in range(8)]
OUT = 8
STEP = 7               # the old adam count, copied by the surgery
MESH_SHAPE, MESH_AXES = (2, 4), ("data", "model")
TX = optax.adam(1e-3)


# -- model and plan ---------------------------------------------------------------------------

def hidden(scale: int, old: bool) -> tuple[int, int]:
  return (32 * scale, 64 * scale) if old else (48 * scale, 80 * scale)


def param_shapes(scale: int, old: bool) -> dict:
  f = len(OLD_FEATURES if old else NEW_FEATURES)
  h1, h2 = hidden(scale, old)
  return {"l1": {"w": (f, h1), "b": (h1,)}, "l2": {"w": (h1, h2), "b": (h2,)},
          "l3": {"w": (h2, OUT), "b": (OUT,)}}


def mlp(p, x):
  h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
  h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
  return h @ p["l3"]["w"] + p["l3"]["b"]


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def abstract_params(scale: int, old: bool) -> dict:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(scale, old), is_leaf=_is_shape)


@functools.cache
def plan(scale: int) -> js.Surgery:
  """The surgery, planned from abstract shapes (nothing is allocated)."""
  names = (OLD_FEATURES, NEW_FEATURES)
  tables = [js.dependency_table(mlp, abstract_params(scale, old), jax.ShapeDtypeStruct((4, len(n)), jnp.float32),
                                js.Features(n)) for old, n in ((True, names[0]), (False, names[1]))]
  return js.plan(*tables)


# -- states (numpy, from seeds: every process builds the same ones) ----------------------------

def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _filled(abstract, fill):
  """``abstract`` with each leaf replaced by ``fill(index, path, leaf)`` (index: position in the flat tree)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  return jax.tree_util.tree_unflatten(treedef, [fill(i, path_str(p), x) for i, (p, x) in enumerate(flat)])


def state_abstract(scale: int, old: bool) -> dict:
  params = abstract_params(scale, old)
  return {"params": params, "opt_state": jax.eval_shape(TX.init, params)}


def old_state(scale: int, seed: int = 0) -> dict:
  """A trained-looking old state: random params and moments (``nu`` > 0), count ``STEP``."""
  def fill(i, path, x):
    rng = np.random.default_rng([seed, i])
    if x.shape == ():
      return np.asarray(STEP, x.dtype)
    values = rng.standard_normal(x.shape).astype(x.dtype)
    return np.abs(values) if "/nu/" in path else values
  return _filled(state_abstract(scale, True), fill)


def new_state_init(scale: int, seed: int = 1) -> dict:
  """The new model's init: random params, adam's zero moments and count."""
  def fill(i, path, x):
    if path.startswith("params/"):
      return np.random.default_rng([seed, i]).standard_normal(x.shape).astype(x.dtype)
    return np.zeros(x.shape, x.dtype)
  return _filled(state_abstract(scale, False), fill)


def flat(tree) -> dict:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- layouts: which PartitionSpec each leaf gets on the 2x4 ("data", "model") mesh -------------

_TP = {"l1/w": (None, "model"), "l1/b": ("model",),   # column-parallel
       "l2/w": ("model", None), "l2/b": (),             # row-parallel
       "l3/w": (None, "model"), "l3/b": ("model",)}


def spec(layout: str, path: str, shape) -> jax.sharding.PartitionSpec:
  """``fsdp``: the largest axis over both mesh axes; ``fsdp_data``: over "data" only;
  ``tp``: kernels column / row sharded over "model" (replicated over "data")."""
  P = jax.sharding.PartitionSpec
  if not shape:
    return P()
  if layout == "tp":
    key = next((k for k in _TP if path.endswith(k)), None)
    return P(*_TP[key]) if key else P()
  axes = {"fsdp": MESH_AXES, "fsdp_data": ("data",)}[layout]
  size = int(np.prod([MESH_SHAPE[MESH_AXES.index(a)] for a in axes]))
  largest = int(np.argmax(shape))
  if shape[largest] % size:
    return P()
  parts = [None] * len(shape)
  parts[largest] = axes
  return P(*parts)


def shardings(tree, mesh, layout: str):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.sharding.NamedSharding(mesh, spec(layout, path_str(p), np.shape(x))), tree)


def auto_mesh(devices=None) -> jax.sharding.Mesh:
  """A 2x4 mesh with Auto axes (the sharding-in-types "Explicit" mode is checked separately)."""
  devices = np.array(jax.devices() if devices is None else devices).reshape(MESH_SHAPE)
  return jax.sharding.Mesh(devices, MESH_AXES)


# -- checks -------------------------------------------------------------------------------------

def sharding_mismatches(result, target) -> list[str]:
  out = []
  for path, x in flat(result).items():
    want = flat(target)[path]
    if not x.sharding.is_equivalent_to(want, x.ndim):
      out.append(f"{path}: {x.sharding} instead of {want}")
  return out


def shard_mismatches(result, reference) -> list[str]:
  """Every addressable shard of every leaf against the same slice of the reference."""
  ref = flat(reference)
  out = []
  for path, x in flat(result).items():
    for shard in x.addressable_shards:
      if not np.array_equal(np.asarray(shard.data), np.asarray(ref[path])[shard.index]):
        out.append(f"{path} shard {shard.index} on {shard.device}")
  return out


def semantic_failures(old, result, scale: int) -> list[str]:
  """A few facts of the surgery, independent of any reference: rows follow their features,
  old units keep their values (params and moments), new features' rows are 0, count is copied."""
  old, new = flat(old), {k: np.asarray(v) for k, v in flat(result).items()}
  h1 = hidden(scale, True)[0]
  out = []
  for prefix in ("params/", "opt_state/0/mu/", "opt_state/0/nu/"):
    w_old, w_new = np.asarray(old[prefix + "l1/w"]), new[prefix + "l1/w"]
    for i, f in enumerate(NEW_FEATURES):
      want = w_old[OLD_FEATURES.index(f)] if f in OLD_FEATURES else np.zeros(h1, w_new.dtype)
      if not np.array_equal(w_new[i, :h1], want):
        out.append(f"{prefix}l1/w row of {f}")
  if int(new["opt_state/0/count"]) != STEP:
    out.append(f"opt_state/0/count is {new['opt_state/0/count']}, not {STEP}")
  return out


def _put(tree, target_shardings):
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, target_shardings)


def check(old_layout: str, new_layout: str) -> dict:
  """Params and adam state, old sharded one way and new another: every result leaf must have
  the new init's sharding, and every shard must equal a single-device reference."""
  scale, surgery, mesh = 1, plan(1), auto_mesh()
  old_np, new_np = old_state(scale), new_state_init(scale)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  reference = js.remap_state(surgery, jax.device_put(old_np, one), jax.device_put(new_np, one))
  old = _put(old_np, shardings(old_np, mesh, old_layout))
  target = shardings(new_np, mesh, new_layout)
  new = _put(new_np, target)
  params_target = target["params"]
  results = {
      "surgery": (surgery(old["params"], new["params"]), params_target, reference["params"]),
      "remap_state": (js.remap_state(surgery, old, new), target, reference),
      "jit, propagated": (jax.jit(lambda o, n: js.remap_state(surgery, o, n))(old, new), target, reference),
  }
  report = {"leaves": len(flat(new)), "devices": jax.device_count()}
  for name, (result, want, ref) in results.items():
    report[name] = {"shardings": sharding_mismatches(result, want), "values": shard_mismatches(result, ref),
                    "shards": sum(len(x.addressable_shards) for x in jax.tree.leaves(result))}
  report["semantics"] = semantic_failures(old_np, results["remap_state"][0], scale)
  return report


# -- compiled memory ----------------------------------------------------------------------------

def _abstract_sharded(abstract, target_shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, target_shardings)


def _largest_shard(tree) -> tuple[int, str]:
  sizes = {p: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for p, x in flat(tree).items()}
  path = max(sizes, key=sizes.get)
  return sizes[path], path


class _AbstractInitPlanner(state_lib._Planner):
  """Plans from an abstract new init too: only shapes and shardings matter for the program split."""

  def _check_new_init(self):
    pass


def eager_programs_temp(scale: int, layout: str, what: str, program_bytes: int = 0) -> dict:
  """Per-device temp of each program an eager ``surgery(...)`` (``what="params"``) or ``remap_state``
  (``"adam_state"``) runs, lowered from sharded abstract shapes; ``remap.PROGRAM_BYTES`` is set to
  ``program_bytes`` (0 stands for leaves larger than the default 64 MiB budget: one moving leaf per program)."""
  surgery, mesh = plan(scale), auto_mesh()
  old_a, new_a = ((abstract_params(scale, True), abstract_params(scale, False)) if what == "params"
                  else (state_abstract(scale, True), state_abstract(scale, False)))
  old = _abstract_sharded(old_a, shardings(old_a, mesh, layout))
  new = _abstract_sharded(new_a, shardings(new_a, mesh, layout))
  saved, remap_lib.PROGRAM_BYTES = remap_lib.PROGRAM_BYTES, program_bytes
  try:
    if what == "params":
      groups = surgery._programs(old, new)
      leaves = jax.tree.leaves(new)
      programs = [(functools.partial(lambda g, o, n: surgery._apply_leaves(o, n, g), tuple(g)), (old, new),
                   [leaves[i] for i in g]) for g in groups]
    else:
      splan = _AbstractInitPlanner(surgery, old, new, None, None, None).run()
      groups = state_lib._programs(surgery.leaf_plans, list(splan.steps), splan.old_leaves, splan.new_leaves)
      programs = [(functools.partial(state_lib._run_steps, surgery.leaf_plans, tuple(g)),
                   ([(None if s.old_index is None else splan.old_leaves[s.old_index], None) for s in g],
                    [splan.new_leaves[s.new_index] for s in g]), [splan.new_leaves[s.new_index] for s in g])
                  for g in groups]
  finally:
    remap_lib.PROGRAM_BYTES = saved
  temps = [int(jax.jit(fn, out_shardings=[x.sharding for x in outs]).lower(*args).compile()
               .memory_analysis().temp_size_in_bytes) for fn, args, outs in programs]
  shard, shard_path = max(_largest_shard(old), _largest_shard(new))
  return {"programs": len(programs), "temp_bytes": max(temps), "largest_shard_bytes": shard,
          "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(new_a)),
          "largest_shard_leaf": shard_path, "temp_over_largest_shard": max(temps) / shard}


def memory(scale: int, layout: str) -> dict:
  """Per-device sizes of the compiled surgery (params only, and the whole adam state),
  lowered from sharded abstract shapes: no data is allocated, so large scales are cheap."""
  surgery, mesh = plan(scale), auto_mesh()
  out = {"scale": scale, "layout": layout}
  for what, old_a, new_a, fn in (
      ("params", abstract_params(scale, True), abstract_params(scale, False), lambda o, n: surgery(o, n)),
      ("adam_state", state_abstract(scale, True), state_abstract(scale, False),
       lambda o, n: js.remap_state(surgery, o, n))):
    old = _abstract_sharded(old_a, shardings(old_a, mesh, layout))
    target = shardings(new_a, mesh, layout)
    new = _abstract_sharded(new_a, target)
    stats = jax.jit(fn, out_shardings=target).lower(old, new).compile().memory_analysis()
    shard, shard_path = max(_largest_shard(old), _largest_shard(new))
    out[what] = {
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(new_a)),
        "temp_bytes": int(stats.temp_size_in_bytes), "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes), "largest_shard_bytes": shard,
        "largest_shard_leaf": shard_path, "temp_over_largest_shard": stats.temp_size_in_bytes / shard}
  for what in ("params", "adam_state"):
    out[f"{what}_programs"] = eager_programs_temp(scale, layout, what)
  return out


def explicit() -> dict:
  """``jax.make_mesh``'s default mesh (Explicit axes in JAX >= 0.7): does the surgery run on it?"""
  surgery = plan(1)
  mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES)
  old_np, new_np = old_state(1)["params"], new_state_init(1)["params"]
  target = shardings(new_np, mesh, "fsdp")
  old, new = _put(old_np, shardings(old_np, mesh, "fsdp")), _put(new_np, target)
  axis_types = [str(t) for t in mesh.axis_types]
  try:
    result = surgery(old, new)
  except Exception as e:  # noqa: BLE001 - the test reports what was raised
    return {"axis_types": axis_types, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  reference = surgery(jax.device_put(old_np, one), jax.device_put(new_np, one))
  return {"axis_types": axis_types, "error": None, "shardings": sharding_mismatches(result, target),
          "values": shard_mismatches(result, reference)}


# -- two processes --------------------------------------------------------------------------------

def process_layouts():
  return "fsdp", "fsdp"   # every leaf is split over both processes, old and new boundaries differ


def _global(tree, target_shardings):
  """Global arrays from host data that every process holds in full (built from the same seeds)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, target_shardings)


def process(process_id: int, port: int, directory: str) -> dict:
  """One of two processes: write the old state as one sharded checkpoint, restore it into the
  new sharded state with jaxsurgery.orbax.restore, and save this process's shards for the test."""
  import os

  import orbax.checkpoint as ocp

  import jaxsurgery.orbax as jso
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=60)
  try:
    mesh = auto_mesh()
    old_layout, new_layout = process_layouts()
    old_np, new_np = old_state(1), new_state_init(1)
    old = _global(old_np, shardings(old_np, mesh, old_layout))
    target = shardings(new_np, mesh, new_layout)
    new = _global(new_np, target)
    path = os.path.join(directory, "old")
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(path, old)
      ckpt.wait_until_finished()
    restored, report = jso.restore(plan(1), path, new, return_report=True)
    shards = {}
    for leaf_path, x in flat(restored).items():
      for k, shard in enumerate(x.addressable_shards):
        shards[f"{leaf_path}|{k}"] = np.asarray(shard.data)
        shards[f"{leaf_path}|{k}|index"] = np.array([[s.start or 0, s.stop if s.stop is not None else n]
                                                    for s, n in zip(shard.index, x.shape)], np.int64).reshape(-1, 2)
    np.savez(os.path.join(directory, f"shards_{process_id}.npz"), **shards)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "shardings": sharding_mismatches(restored, target),
            "left_behind": [list(x[:1]) for x in report.left_behind], "ok": True}
  finally:
    jax.distributed.shutdown()


def main(argv) -> None:
  mode, args = argv[0], argv[1:]
  if mode == "check":
    out = {pair: check(*pair.split(":")) for pair in args}
  elif mode == "memory":
    out = [memory(int(args[0]), layout) for layout in args[1:]]
  elif mode == "explicit":
    out = explicit()
  elif mode == "process":
    out = process(int(args[0]), int(args[1]), args[2])
  else:
    raise SystemExit(f"unknown mode {mode!r}: use check, memory, explicit or process")
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
