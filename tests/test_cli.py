"""``python -m jaxsurgery apply``: one saved plan over a directory of orbax checkpoints (issue 11 sections 2, 4).

The pool: 4 steps of a training run (params + adam state, changing between saves) in a CheckpointManager
directory. Each new step must equal ``jaxsurgery.orbax.restore`` of the old one; a rerun skips what is done; a
job killed mid-pool and rerun ends with the same pool as an uninterrupted run; bad steps are named; OLD_DIR is
never modified.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxsurgery as js
import jaxsurgery.orbax as jso
from jaxsurgery._src import cli
from jaxsurgery._src.core import features as feats
from jaxsurgery._src.surgery import persist

OLD, NEW = ["hp", "mana", "x"], ["x", "hp", "armor", "mana"]
STEPS = [10, 20, 30, 40, 50, 60]
TX = optax.adam(1e-2)


def flat(tree) -> dict:
  return {feats.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mlp(p, x):
  return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def mlp_params(seed, nin, nh):
  r = np.random.default_rng(seed)   # numpy draws: no compile per shape
  normal = lambda *shape: jnp.asarray(r.standard_normal(shape, np.float32))
  return {"l1": {"w": normal(nin, nh), "b": normal(nh)}, "l2": {"w": normal(nh, 2), "b": normal(2)}}


def train_state(params):
  return {"params": params, "opt_state": TX.init(params), "step": jnp.int32(0)}


def save_pool(root, seed=1, nh=4):
  """A CheckpointManager directory whose steps are a short training run of the old model."""
  state = train_state(mlp_params(seed, 3, nh))
  r = np.random.default_rng(5)
  x, y = jnp.asarray(r.standard_normal((8, 3), np.float32)), jnp.asarray(r.standard_normal((8, 2), np.float32))

  @jax.jit
  def step(s):
    g = jax.grad(lambda p: jnp.mean((mlp(p, x) - y) ** 2))(s["params"])
    u, opt = TX.update(g, s["opt_state"])
    return {"params": optax.apply_updates(s["params"], u), "opt_state": opt, "step": s["step"] + 1}
  with ocp.CheckpointManager(root) as mngr:
    for n in STEPS:
      state = step(state)
      mngr.save(n, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  root = tmp_path_factory.mktemp("pool")
  table = lambda nin, nh, names: js.dependency_table(mlp, mlp_params(0, nin, nh),
                                                     jax.ShapeDtypeStruct((4, nin), jnp.float32), js.Features(names))
  surgery = js.plan(table(3, 4, OLD), table(4, 6, NEW))
  persist.save(surgery, root / "plan")
  save_pool(root / "old")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(root / "init", train_state(mlp_params(2, 4, 6)))
  out = io.StringIO()
  assert cli.apply(str(root / "plan"), str(root / "old"), str(root / "new"), str(root / "init"), progress=False,
                   out=out) == 0
  return {"root": root, "surgery": surgery, "log": out.getvalue()}


def restored(new_dir, step) -> dict:
  with ocp.CheckpointManager(new_dir) as mngr:
    return flat(mngr.restore(step, args=ocp.args.StandardRestore()))


def tree_digest(root) -> dict:
  """Path -> (size, mtime, sha256) of every file under ``root``: any change to OLD_DIR shows."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
        out[os.path.relpath(p, root)] = (os.path.getsize(p), os.stat(p).st_mtime_ns, digest)
  return out


def test_apply_remaps_every_step_and_skips_them_on_rerun(pool):
  root, log = pool["root"], pool["log"]
  init = flat(ocp.StandardCheckpointer().restore(root / "init"))
  with ocp.StandardCheckpointer() as c:
    init_tree = c.restore(root / "init")
  for n in STEPS:
    expected = flat(jso.restore(pool["surgery"], root / "old", init_tree, step=n))
    got = restored(root / "new", n)   # the new pool is a CheckpointManager directory too
    assert sorted(got) == sorted(expected) and int(got["step"]) == STEPS.index(n) + 1
    for p, x in expected.items():
      np.testing.assert_array_equal(got[p], x, err_msg=f"step {n} {p}")
    assert got["params/l1/w"].shape == (4, 6) and not (got["params/l1/w"] == init["params/l1/w"]).all()
    report = json.loads((root / "new" / str(n) / cli.REPORT).read_text())
    assert report["step"] == n and report["plan_id"] == persist.fingerprint(pool["surgery"])
    assert f"step {n}: 14 leaves -- 12 remapped, 2 copied, 0 from the new init; 0 old leaves left behind" in log
  assert sorted(os.listdir(root / "new")) == sorted(map(str, STEPS))   # no temporary directory left
  before = tree_digest(root / "old")
  out = io.StringIO()
  assert cli.apply(str(root / "plan"), str(root / "old"), str(root / "new"), str(root / "init"), progress=False,
                   out=out) == 0
  assert out.getvalue().count("already in NEW_DIR, skipped") == len(STEPS)
  assert tree_digest(root / "old") == before


def test_a_job_killed_mid_pool_and_rerun_gives_the_uninterrupted_pool(pool, tmp_path):
  root = pool["root"]
  before = tree_digest(root / "old")
  new = tmp_path / "new"
  args = [sys.executable, "-m", "jaxsurgery", "apply", str(root / "plan"), str(root / "old"), str(new),
          "--init", str(root / "init"), "--no-progress"]
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
      if new.exists() and any(p.isdigit() for p in os.listdir(new)):   # the first step is in place
        break
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  done = sorted(int(p) for p in os.listdir(new) if p.isdigit())
  assert 1 <= len(done) < len(STEPS), done   # killed in the middle of the pool
  for n in done:   # what is there is complete
    assert (new / str(n) / cli.REPORT).exists()
  out = io.StringIO()
  assert cli.apply(str(root / "plan"), str(root / "old"), str(new), str(root / "init"), progress=False, out=out) == 0
  assert out.getvalue().count("already in NEW_DIR") == len(done)
  assert sorted(os.listdir(new)) == sorted(map(str, STEPS))
  for n in STEPS:
    a, b = restored(new, n), restored(root / "new", n)
    for p, x in b.items():
      np.testing.assert_array_equal(a[p], x, err_msg=f"step {n} {p}")
  assert tree_digest(root / "old") == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax, reading corrupt data
def test_bad_steps_are_named_and_the_good_ones_written(pool, tmp_path):
  root = pool["root"]
  bad = tmp_path / "old"
  shutil.copytree(root / "old", bad)
  shutil.rmtree(bad / "20")
  save_pool(tmp_path / "other", nh=5)   # another model's checkpoint as step 20
  shutil.copytree(tmp_path / "other" / "20", bad / "20")
  for f in (bad / "30" / "default").rglob("d/*"):                          # corrupt data
    f.write_bytes(b"\0" * 7)
  os.remove(bad / "40" / "default" / "_METADATA")                          # a partial step
  (bad / "50.orbax-checkpoint-tmp-123").mkdir()                             # an unfinished save: not a step
  before = tree_digest(bad)
  out = io.StringIO()
  status = cli.apply(str(root / "plan"), str(bad), str(tmp_path / "new"), str(root / "init"), progress=False, out=out)
  log = out.getvalue()
  assert status == 1, log
  assert "error: step 20 (" in log and "'params/l1/w' is (3, 5) float32" in log
  assert "error: step 30 (" in log and "Could not read the checkpoint at" in log and "30/default" in log
  assert "error: step 40 (" in log and "no _METADATA" in log
  assert "50.orbax-checkpoint-tmp-123' is an unfinished orbax save" in log
  assert "3 written, 0 already done, 3 failed (steps 20, 30, 40)" in log
  assert sorted(os.listdir(tmp_path / "new")) == ["10", "50", "60"]
  assert tree_digest(bad) == before
  out = io.StringIO()
  assert cli.apply(str(root / "plan"), str(bad), str(tmp_path / "new2"), str(root / "init"), steps="20-40",
                   progress=False, fail_fast=True, out=out) == 1
  assert out.getvalue().count("error:") == 1


def test_command_line_errors(pool, tmp_path, capsys):
  root = pool["root"]
  argv = lambda *a: ["apply", str(root / "plan"), str(root / "old"), *a, "--init", str(root / "init"), "--no-progress"]
  assert cli.main(argv(str(root / "old" / "sub"))) == 2
  assert "must not be OLD_DIR" in capsys.readouterr().err
  assert cli.main(argv(str(tmp_path / "n"), "--steps", "15")) == 2
  assert "no step 15 in OLD_DIR; its steps are 10, 20" in capsys.readouterr().err
  assert cli.main(["apply", str(tmp_path), str(root / "old"), str(tmp_path / "n"), "--init", "x:y"]) == 2
  assert "is not a saved plan" in capsys.readouterr().err
  assert cli.main(argv(str(tmp_path / "n"), "--rename", "nothing")) == 2
  assert "expected OLD=NEW" in capsys.readouterr().err
  assert cli.main(["show", str(root / "plan")]) == 0
  assert "function preserved" in capsys.readouterr().out
  os.makedirs(tmp_path / "taken" / "10")   # a step directory this plan did not write
  out = io.StringIO()
  assert cli.apply(str(root / "plan"), str(root / "old"), str(tmp_path / "taken"), str(root / "init"), steps="10",
                   progress=False, out=out) == 1
  assert "was not written by `python -m jaxsurgery apply`" in out.getvalue()
