"""bench/cgroups.py: the benchmarks' memory caps and cold page caches (the figures of
bench_stream, bench_120b, bench_serve and vs_llamacpp --cgroup_gb rest on them)."""

import os
import subprocess
import sys

import pytest

from bench import cgroups
from tests.conftest import ROOT

needs_cgroups = pytest.mark.skipif(
    not os.access(cgroups.CGROUP_ROOT, os.W_OK),
    reason=f"needs a writable cgroup v1 memory hierarchy at {cgroups.CGROUP_ROOT} (root)")


def _filesystem(path: str) -> str:
  best = ("", "")
  for line in open("/proc/mounts"):
    _, mount, kind = line.split()[:3]
    if (path + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best[0]):
      best = (mount, kind)
  return best[1]


def test_a_dropped_file_is_not_cached_and_a_read_one_is(tmp_path):
  if _filesystem(str(tmp_path)) in ("tmpfs", "ramfs"):
    pytest.skip("the test folder is in memory (tmpfs): its pages cannot leave the page cache")
  path = tmp_path / "model.bin"
  path.write_bytes(os.urandom(4 << 20))  # dirty pages: drop_page_cache fsyncs them first
  cgroups.drop_page_cache([str(path)])
  assert cgroups.cached_bytes([str(path)]) == 0
  with open(path, "rb") as f:
    f.read()
  assert cgroups.cached_bytes([str(path)]) == 4 << 20
  assert cgroups.files_under(str(tmp_path)) == [str(path)]


def test_importing_the_helper_loads_no_jax():
  # llama.cpp's measured process imports it: JAX there would be charged to llama.cpp's cap
  out = subprocess.run([sys.executable, "-c", "import sys, bench.cgroups; "
                        "print(sorted(m for m in ('jax', 'lazymoe_jax') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@needs_cgroups
def test_a_process_over_its_cap_is_oom_killed_and_counted():
  limit = 64 << 20
  with cgroups.MemoryCgroup("test_oom", limit) as cg:
    # 256 MB of anonymous memory touched page by page: cannot be reclaimed, so the kernel kills
    done = subprocess.run(cg.command([sys.executable, "-c",
                                      "b = bytearray(256 << 20)\n"
                                      "for i in range(0, len(b), 4096): b[i] = 1"]))
    assert done.returncode == -9
    assert cg.oom_kills() == 1
    assert limit // 2 < cg.peak_bytes() <= limit
    path = cg.path
  assert not os.path.exists(path)  # removed on exit


@needs_cgroups
def test_the_command_is_charged_from_its_start_and_pinned():
  with cgroups.MemoryCgroup("test_join") as cg:
    code = ("import os; print(open('/proc/self/cgroup').read().count('" +
            os.path.basename(cg.path) + "'), sorted(os.sched_getaffinity(0)))")
    out = subprocess.run(cg.command([sys.executable, "-c", code], [0]), capture_output=True,
                         text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["1", "[0]\n"]
    assert cg.peak_bytes() > 0  # the interpreter itself was charged here
