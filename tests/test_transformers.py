"""Issue 9 section 3: widening transformers, exactly, with the recipe found automatically.

Three families -- a pre-LN GPT in plain JAX (learned positions, LayerNorm, tied embedding), a
Llama-style stack (RMSNorm, SwiGLU, optionally RoPE) and a Flax NNX block (nnx.MultiHeadAttention,
nnx.LayerNorm, MLP) -- each widened one change at a time and with all changes together. Where a
normalisation's width changes, the new model uses the epsilon the recipe needs (``eps * h/h_new``,
LEMON's ``inflate_ln``); with the same epsilon the report names the bound instead.
"""

import dataclasses

import jax
import numpy as np
import pytest
from transformers_zoo import Cfg, gpt, llama, nnx_block

import jaxsurgery as js

BASE = Cfg()
FAMILIES = {"gpt": gpt, "gpt_fast_var": lambda c: gpt(dataclasses.replace(c, fast_var=True)),
            "llama": llama, "nnx": nnx_block}


def widened(cfg: Cfg, **changes) -> Cfg:
  new = dataclasses.replace(cfg, **changes)
  return dataclasses.replace(new, eps=cfg.eps * cfg.d / new.d)  # the epsilon average expansion needs


CHANGES = {
    "d_8_12": dict(d=12),
    "heads_2_4": dict(heads=4),
    "head_dim_4_6": dict(head_dim=6),
    "mlp_16_24": dict(mlp=24),
    "one_more_layer": dict(layers=3),
    "vocab_plus_5": dict(vocab=16),  # the new logits are compared on the old vocabulary (a slice)
    "together": dict(d=12, heads=3, head_dim=6, mlp=24, layers=3, vocab=16),
}


def plan_and_verify(family, old_cfg: Cfg, new_cfg: Cfg, **plan_kw):
  old_fn, old_init, tokens = FAMILIES[family](old_cfg)
  new_fn, new_init_fn, new_tokens = FAMILIES[family](new_cfg)
  if new_cfg.vocab != old_cfg.vocab:  # compare the logits of the old vocabulary (unnamed outputs)
    grown_fn = new_fn
    new_fn = lambda p, ids: grown_fn(p, ids)[..., :old_cfg.vocab]
  old_p, new_init = old_init(jax.random.key(0)), new_init_fn(jax.random.key(1))
  old_t = js.dependency_table(old_fn, old_p, tokens, "tokens", strict=True)
  new_t = js.dependency_table(new_fn, new_init, new_tokens, "tokens", strict=True)
  surgery = js.plan(old_t, new_t, **plan_kw)
  new_p = surgery(old_p, new_init)
  check = js.verify(surgery, old_fn, new_fn, old_p, new_p, tokens, new_tokens, key=jax.random.key(2),
                    atol=1e-5, samples=2)
  return surgery, new_p, new_init, check


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_widening_is_exact(family, change):
  surgery, _, _, check = plan_and_verify(family, BASE, widened(BASE, **CHANGES[change]))
  assert surgery.report.preserved is True, surgery.report
  assert check.ok, (check, surgery.report)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_model_width_by_clone_is_exact_with_the_same_epsilon(family):
  surgery, new_p, _, check = plan_and_verify(family, BASE, dataclasses.replace(BASE, d=16), widen="clone")
  assert surgery.report.preserved is True and check.ok, (check, surgery.report)
  emb = np.asarray(new_p["emb"])
  # the old columns, repeated, apart from the zero-sum noise between the copies of fan-in leaves
  np.testing.assert_allclose(emb[:, 8:], emb[:, :8], atol=1e-6)
  assert any("clone" in h for leaf in surgery.report.leaves for h in leaf.how)


def test_clone_needs_a_multiple():
  with pytest.raises(js.SurgeryError, match="integer multiples.*8 -> 12"):
    plan_and_verify("gpt", BASE, dataclasses.replace(BASE, d=12), widen="clone")


def test_layernorm_with_the_same_epsilon_names_the_bound_and_verify_measures_it():
  surgery, _, _, check = plan_and_verify("gpt", BASE, dataclasses.replace(BASE, d=12))
  assert surgery.report.preserved is None
  note = " ".join(surgery.report.reasons)
  assert "exact only if the new constant is" in note and "layer_norm" in note, note
  assert not check.ok and max(check.max_abs_diff.values()) < 1e-2, check  # small, but measured


@pytest.mark.parametrize("change", ["head_dim_4_6", "together"])
def test_rope_on_a_widened_head_dim_is_refused_with_the_rotation_named(change):
  cfg = dataclasses.replace(BASE, rope=True)
  surgery, _, _, _ = plan_and_verify("llama", cfg, widened(cfg, **CHANGES[change]))
  assert surgery.report.preserved is not True
  assert any("rotary" in r for r in surgery.report.reasons), surgery.report.reasons


@pytest.mark.parametrize("change", ["d_8_12", "heads_2_4", "one_more_layer"])
def test_rope_with_the_same_head_dim_is_exact(change):
  cfg = dataclasses.replace(BASE, rope=True)
  surgery, _, _, check = plan_and_verify("llama", cfg, widened(cfg, **CHANGES[change]))
  assert surgery.report.preserved is True and check.ok, (check, surgery.report)


def test_recipes_are_the_published_ones():
  """d 8 -> 12 in the GPT: LEMON's average expansion (writers' new columns are the mean, gains
  x sqrt(8/12), new norm offsets zero); head_dim 4 -> 6: Gesmundo's new K columns zero and
  K x sqrt(6/4); the inserted layer writes zeros into the stream."""
  surgery, new_p, new_init, _ = plan_and_verify("gpt", BASE, widened(BASE, d=12))
  emb = np.asarray(new_p["emb"])
  np.testing.assert_allclose(emb[:, 8:], np.repeat(emb[:, :8].mean(1, keepdims=True), 4, 1), rtol=1e-5)
  leaves = {l.path: l for l in surgery.report.leaves}
  assert leaves["h0/ln1/g"].scale == pytest.approx(np.sqrt(8 / 12))
  np.testing.assert_array_equal(np.asarray(new_p["h0"]["ln1"]["b"])[8:], 0)
  np.testing.assert_array_equal(np.asarray(new_p["h0"]["q"])[8:], np.asarray(new_init["h0"]["q"])[8:])

  surgery, new_p, new_init, _ = plan_and_verify("gpt", BASE, widened(BASE, head_dim=6))
  k = np.asarray(new_p["h0"]["k"]).reshape(8, 2, 6)
  np.testing.assert_array_equal(k[:, :, 4:], 0)
  assert {l.path: l for l in surgery.report.leaves}["h0/k"].scale == pytest.approx(np.sqrt(6 / 4))

  surgery, new_p, new_init, _ = plan_and_verify("gpt", BASE, widened(BASE, layers=3))
  moved = {n: o for o, n, _ in surgery.report.matching}
  new_block = [n for n in ("h0", "h1", "h2") if f"{n}/o" not in moved]
  assert len(new_block) == 1
  blk = new_p[new_block[0]]
  np.testing.assert_array_equal(np.asarray(blk["o"]), 0)
  np.testing.assert_array_equal(np.asarray(blk["w2"]), 0)
  np.testing.assert_array_equal(np.asarray(blk["q"]), np.asarray(new_init[new_block[0]]["q"]))
