"""lazymoe_jax/store/experts.py: expert chunk reads, their checksums, and the uncached read
mechanism on each platform (O_DIRECT, F_NOCACHE, buffered with a warning)."""

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lazymoe_jax
from lazymoe_jax.store import format as fmt
from tests.conftest import convert_cli


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_expert_chunk_is_detected(tiny_stores, tmp_path, damage):
  store = tmp_path / "store"
  shutil.copytree(tiny_stores["mixtral"][1], store)
  chunk = fmt.chunk_path(str(store), "w_down", 1, 2)
  data = bytearray(open(chunk, "rb").read())
  if damage == "truncate":
    open(chunk, "wb").write(data[:len(data) // 2])
  elif damage == "flip":
    data[100] ^= 0x40
    open(chunk, "wb").write(data)
  else:
    os.remove(chunk)
  engine = lazymoe_jax.load(str(store), expert_slots=2)
  with pytest.raises(lazymoe_jax.StoreError, match="c/1/2/0/0") as info:
    for e in range(engine.spec.num_experts):  # read every expert of layer 1 once
      engine.pool.acquire(1, [e])
  assert "re-convert" in str(info.value)


def test_all_zero_expert_chunk_is_not_missing(tiny_stores, tmp_path):
  """tensorstore writes no file for a chunk equal to the fill value: a zeroed expert is read as
  zeros (checked against the manifest's crc32), not reported missing."""
  src = tmp_path / "hf"
  shutil.copytree(tiny_stores["mixtral"][0], src)
  weights = load_file(str(src / "model.safetensors"))
  name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
  weights[name] = np.zeros_like(weights[name])
  save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
  res = convert_cli(str(src), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-2000:]
  assert not os.path.exists(fmt.chunk_path(str(tmp_path / "store"), "w_down", 0, 1))
  engine = lazymoe_jax.load(str(tmp_path / "store"), expert_slots=4)
  slot = engine.pool.acquire(0, [1])[0]
  assert not engine.pool.buffers[slot]["w_down"].any()
  assert engine.pool.buffers[slot]["w_gate_up"].any()  # the expert's other tensor is its own


def _read_first_chunks(store):
  """Every array's chunk (row 0, expert 1) through read_chunk, on this thread."""
  from lazymoe_jax.store import experts  # pylint: disable=import-outside-toplevel
  es = experts.ExpertStore(store, fmt.read_manifest(store))
  out = {}
  for name in es.specs:
    out[name] = np.empty(es.shapes[name], es.dtypes[name])
    experts.read_chunk(es.chunk_path(name, 0, 1), out[name], es.crc32[name][0][1])
  return out


@pytest.fixture
def fresh_mechanism(monkeypatch):
  """The read mechanism chosen again (and warnings given again) under the test's patches."""
  from lazymoe_jax.store import experts  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(experts, "_MECHANISM", None)
  monkeypatch.setattr(experts, "_WARNED", set())
  return experts


def test_reads_without_o_direct_use_f_nocache_where_fcntl_has_it(demo_store, fresh_mechanism,
                                                                 monkeypatch):
  fcntl = pytest.importorskip("fcntl")
  want = _read_first_chunks(demo_store)
  monkeypatch.setattr(fresh_mechanism, "_MECHANISM", None)  # chosen for `want`: again
  monkeypatch.delattr(os, "O_DIRECT")
  calls = []
  monkeypatch.setattr(fcntl, "F_NOCACHE", 48, raising=False)  # macOS's value; Linux has none
  monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((cmd, arg)))
  got = _read_first_chunks(demo_store)
  assert fresh_mechanism.uncached_read_mechanism() == "f_nocache"
  assert calls == [(48, 1)] * len(want)  # one per chunk file
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_reads_without_o_direct_nor_f_nocache_are_buffered_with_one_warning(
    demo_store, fresh_mechanism, monkeypatch):
  import fcntl  # pylint: disable=import-outside-toplevel
  want = _read_first_chunks(demo_store)
  monkeypatch.setattr(fresh_mechanism, "_MECHANISM", None)  # chosen for `want`: again
  monkeypatch.delattr(os, "O_DIRECT")
  monkeypatch.delattr(fcntl, "F_NOCACHE", raising=False)
  monkeypatch.delattr(os, "posix_fadvise")
  with pytest.warns(RuntimeWarning, match="page cache.*Linux") as record:
    got = _read_first_chunks(demo_store)
    fresh_mechanism.drop_file_from_page_cache(os.path.join(demo_store, fmt.MANIFEST))
  assert len(record) == 1  # once per process, not per read
  assert fresh_mechanism.uncached_read_mechanism() == "buffered"
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_drop_from_page_cache_is_a_no_op_without_posix_fadvise(tmp_path, fresh_mechanism,
                                                              monkeypatch):
  monkeypatch.delattr(os, "posix_fadvise")
  (tmp_path / "f").write_bytes(b"x" * 100)
  with pytest.warns(RuntimeWarning, match="posix_fadvise is not available"):
    fresh_mechanism.drop_file_from_page_cache(str(tmp_path / "f"))
  assert (tmp_path / "f").read_bytes() == b"x" * 100
