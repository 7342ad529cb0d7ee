"""A real `python -m lazymoe_jax.serve` on 127.0.0.1 and a free port, for the server tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def http(method: str, url: str, body=None, headers=None, timeout: float = 60.0):
  """(status, parsed JSON or text) of one request; errors are answers, not exceptions."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      status, raw = r.status, r.read()
  except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
  try:
    return status, json.loads(raw)
  except ValueError:
    return status, raw.decode(errors="replace")


class Server:
  """Starts the server as a user would; `seen_loading` records a 503 from /health and from a
  completion request while the model was loading (with --warmup that takes seconds)."""

  def __init__(self, store: str, *args: str, timeout: float = 240.0):
    self.store = store
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = open(os.path.join(os.path.dirname(store), f"serve-{self.port}.log"), "w+")
    env = {**os.environ, "PYTHONPATH": ROOT}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "lazymoe_jax.serve", f"--model={store}", "--host=127.0.0.1",
         f"--port={self.port}", *args], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        env=env)
    self.seen_loading = []
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
      try:
        status, body = http("GET", self.url + "/health", timeout=5)
      except OSError:
        time.sleep(0.3)
        continue
      if status == 200:
        return
      if not self.seen_loading:
        self.seen_loading.append((status, body))
        self.seen_loading.append(http("POST", self.url + "/v1/completions",
                                      {"prompt": "x", "max_tokens": 1}, timeout=5))
      time.sleep(0.3)
    logs = self.logs()  # before close(), which closes the log file
    self.close()
    raise RuntimeError(f"server not ready after {timeout} s:\n{logs}")

  def logs(self) -> str:
    self.log.flush()
    with open(self.log.name) as f:
      return f.read()[-5000:]

  def metrics(self) -> dict[str, float]:
    """The Prometheus figures without labels, by name."""
    with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
      text = r.read().decode()
    out = {}
    for line in text.splitlines():
      if line and not line.startswith("#") and "{" not in line:
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(20)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
