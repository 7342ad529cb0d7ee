"""Loading inside the budget (issue 16): embedding rows from the store, the head stored in its
compute encoding, the load under a memory cgroup cap equal to its plan, the planner CLI."""

import json
import os
import subprocess
import sys

import ml_dtypes  # noqa: F401  (safetensors' bf16)
import numpy as np
import pytest
from safetensors.numpy import load_file

import lazymoe_jax
from lazymoe_jax import families
from lazymoe_jax import kv as kv_lib
from lazymoe_jax.engine import budget
from lazymoe_jax.engine.weights import ResidentRows, StoredRows
from lazymoe_jax.store import format as fmt
from lazymoe_jax.store.embedding import EmbeddingTable
from bench import cgroups
from tests.conftest import ROOT, convert_cli, token_ids


def _embedding(hf_dir):
  out = {}
  for name in os.listdir(hf_dir):
    if name.endswith(".safetensors"):
      out |= {k: v for k, v in load_file(os.path.join(hf_dir, name)).items() if "embed" in k}
  return out["model.embed_tokens.weight"]


def test_rows_from_the_store_equal_the_embedding(tiny_stores):
  hf, store = tiny_stores["mixtral"]
  manifest = fmt.read_manifest(store)
  assert manifest["version"] == 5 and manifest["embedding"]["shape"] == [96, 32]
  table = EmbeddingTable(store, manifest["embedding"])
  ref = np.asarray(_embedding(hf), np.float32)
  ids = np.array([5, 0, 95, 5, 17, 64, 3])  # repeats, both ends, across inner chunks
  np.testing.assert_array_equal(table.rows(ids), ref[ids])
  np.testing.assert_array_equal(table.rows(np.arange(96)), ref)
  # the rows kept between calls: at most _recent_max, each its own copy (no view keeping a
  # whole read block alive), and still right when they are returned again
  table._recent_max = 10  # pylint: disable=protected-access
  table.rows(np.arange(96))
  held = list(table._recent.values())  # pylint: disable=protected-access
  assert len(held) == 10 and all(r.base is None and r.shape == (32,) for r in held)
  np.testing.assert_array_equal(table.rows(ids[::-1]), ref[ids[::-1]])
  np.testing.assert_array_equal(table.rows(np.arange(90, 96)), ref[90:])
  # under a budget the table is not held; without one it is read whole: the same rows
  budgeted = lazymoe_jax.load(store, memory_budget_gb=8.0, max_context=64)
  assert isinstance(budgeted.forward.embed, StoredRows)
  assert "embed" not in budgeted.forward.globals
  np.testing.assert_array_equal(np.asarray(budgeted.forward.embed(ids)), ref[ids])
  whole = lazymoe_jax.load(store, expert_slots=budgeted.pool.num_slots, max_context=64)  # alike
  assert isinstance(whole.forward.embed, ResidentRows)
  itemsize = fmt.numpy_dtype(manifest["embedding"]["dtype"]).itemsize
  assert whole.dense_bytes == budgeted.dense_bytes + 96 * 32 * itemsize  # counted
  np.testing.assert_array_equal(np.asarray(whole.forward.embed(ids)), ref[ids])
  np.testing.assert_array_equal(whole.logits(ids), budgeted.logits(ids))


def test_head_stored_int8_gives_the_logits_of_reencoding_at_load(tiny_stores, tmp_path):
  hf, _ = tiny_stores["mixtral"]
  for head in ("keep", "int8"):
    res = convert_cli(hf, str(tmp_path / head), f"--head_dtype={head}")
    assert res.returncode == 0, res.stderr[-2000:]
  assert fmt.read_manifest(str(tmp_path / "int8"))["head"]["encoding"] == "int8"
  assert fmt.read_manifest(str(tmp_path / "keep"))["head"]["encoding"] == "float32"
  ids = token_ids(12)
  at_load = lazymoe_jax.load(str(tmp_path / "keep"), expert_slots=8, dense_dtype="int8")
  stored = lazymoe_jax.load(str(tmp_path / "int8"), expert_slots=8, dense_dtype="int8")
  assert stored.forward.globals["lm_head"].encoding.name == "int8"
  # the same per-row encoding of the same floats, at conversion or at load: exactly equal
  np.testing.assert_array_equal(stored.logits(ids), at_load.logits(ids))
  # int8 experts make int8 the default head
  res = convert_cli(hf, str(tmp_path / "q"), "--expert_dtype=int8")
  assert res.returncode == 0, res.stderr[-2000:]
  assert fmt.read_manifest(str(tmp_path / "q"))["head"]["encoding"] == "int8"
  res = convert_cli(hf, str(tmp_path / "bad"), "--head_dtype=int3")
  assert res.returncode != 0 and "head_dtype" in res.stderr


def test_too_small_budget_fails_before_loading(tiny_stores, monkeypatch):
  _, store = tiny_stores["mixtral"]
  from lazymoe_jax.engine import weights  # pylint: disable=import-outside-toplevel

  def never(*a, **k):
    raise AssertionError("the dense params were read")
  monkeypatch.setattr(weights, "load", never)
  with pytest.raises(lazymoe_jax.PlanError, match="it needs at least"):
    lazymoe_jax.load(store, memory_budget_gb=0.05)


def test_planner_cli_matches_the_engine_plan(tiny_stores):
  _, store = tiny_stores["mixtral"]
  res = subprocess.run([sys.executable, "-m", "lazymoe_jax.plan", f"--model={store}",
                        "--memory_budget_gb=1.0", "--max_context=128", "--parallel=3", "--json"],
                       cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  for key in ("decode_tokens_per_s", "time_to_first_token_s", "disk_GBps",
              "bytes_read_per_token", "compute_s_per_token", "what_if", "memory_plan"):
    assert key in out, key
  assert out["decode_tokens_per_s"] > 0 and out["time_to_first_token_s"] > 0
  assert set(out["what_if"]) == {"budget_2_GB", "int4_experts", "disk_3.5_GBps",
                                 "disk_7_GBps"}
  assert "memory plan for 1.00 GB" in res.stdout
  # --parallel: three batch slots of 128 + 1 positions, and a layer each for resizing
  assert "(3 sequences x 128 positions + 1 scratch each, + " in res.stdout
  # the engine's plan, in a fresh process as the CLI's (runtime grows as a process loads)
  eng = subprocess.run([sys.executable, "-c", "import json, sys, lazymoe_jax; e = lazymoe_jax."
                        "load(sys.argv[1], memory_budget_gb=1.0, max_context=128, parallel=3); "
                        "print(json.dumps(e.planned.as_dict()))", store], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert eng.returncode == 0, eng.stderr[-3000:]
  mine, cli = json.loads(eng.stdout.strip().splitlines()[-1]), out["memory_plan"]
  for key in ("dense_bytes", "kv_bytes", "max_context", "margin_bytes", "bytes_per_expert",
              "load_extra_bytes", "budget_bytes", "sequences", "kv_layer_bytes",
              "kv_limit_bytes"):
    assert cli[key] == mine[key], key
  spec = families.spec_from_hf(fmt.read_manifest(store)["hf_config"])
  kv = kv_lib.make(None)
  assert cli["kv_bytes"] == 3 * (budget.kv_bytes(kv, spec, 129) +
                                 budget.kv_layer_bytes(kv, spec, 129))
  # the runtime is measured in each process the same way (budget.runtime_bytes)
  assert abs(cli["runtime_bytes"] - mine["runtime_bytes"]) < 32 << 20
  # and the engine's plan is the shared function's, given the same runtime
  # (in this process, whose resident memory grows with the tests run before: a budget above it)
  gb = round(budget.runtime_bytes() / 1e9 + 1.0, 2)
  engine = lazymoe_jax.load(store, memory_budget_gb=gb, max_context=128)
  again = budget.plan_store(store, gb, engine.planned.runtime_bytes, max_context=128)
  assert again == engine.planned


_CHILD = r"""
import json, os, sys
import lazymoe_jax
from lazymoe_jax.engine import budget
store, cg = sys.argv[1], sys.argv[2]
try:
  budget.plan_store(store, 0.01, budget.runtime_bytes(), max_context=64)
except lazymoe_jax.PlanError as e:
  need = float(str(e).split("at least ")[1].split(" GB")[0]) + 0.01
# the cap, from now on (before a byte of the model is read): the plan's budget
with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
  f.write(str(int(need * 1e9)))
engine = lazymoe_jax.load(store, memory_budget_gb=need, max_context=64)
out = engine.generate([5, 6, 7, 8], 8)
print("RESULT " + json.dumps({"need": need, "slots": engine.pool.num_slots, "n": len(out)}))
"""


@pytest.mark.skipif(not os.access(cgroups.CGROUP_ROOT, os.W_OK),
                    reason=f"needs a writable cgroup v1 memory hierarchy at {cgroups.CGROUP_ROOT} "
                    "(root)")
def test_loads_and_runs_under_a_cgroup_cap_equal_to_its_plan(tiny_stores):
  _, store = tiny_stores["mixtral"]
  with cgroups.MemoryCgroup("test_loadplan") as cg:  # the child caps it itself, after startup
    res = subprocess.run(cg.command([sys.executable, "-c", _CHILD, store, cg.path]), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    ooms, peak = cg.oom_kills(), cg.peak_bytes()
    limit = int(cg.stat_file("memory.limit_in_bytes"))
  assert res.returncode == 0 and ooms == 0, (res.returncode, ooms, res.stderr[-3000:])
  row = json.loads([l for l in res.stdout.splitlines() if l.startswith("RESULT ")][0][7:])
  assert row["n"] == 8 and row["slots"] >= 2
  assert abs(limit - int(row["need"] * 1e9)) < 4096 and peak <= limit
