"""pipeline.memory: freed buffers leave the resident set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A freed 24 MiB buffer raises glibc's dynamic mmap threshold to 24 MiB; 8 MiB buffers then
# come from the heap, a small allocation after each pins it, and freeing them keeps their
# pages resident. With the threshold fixed they are memory maps and leave at once.
_PROBE = """
import json, sys
import torch
from pipeline.memory import release_freed_buffers

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

fixed = release_freed_buffers() if sys.argv[1] == "fixed" else None
big = torch.ones(6 << 20)  # 24 MiB
del big
before = rss()
keep, pins = [], []
for _ in range(12):
    keep.append(torch.ones(2 << 20))  # 8 MiB, written
    pins.append(torch.ones(64))
peak = rss()
del keep
after = rss()
print(json.dumps({"fixed": fixed, "grew": peak - before, "left": after - before}))
"""


def _probe(mode: str) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_buffers_leave_the_resident_set_once_released():
    mib = 1 << 20
    fixed = _probe("fixed")
    assert fixed["fixed"] is True
    assert fixed["grew"] > 80 * mib, "the probe cannot see its own buffers"
    assert fixed["left"] < 8 * mib, f"{fixed['left'] / mib:.0f} MiB of freed buffers stayed resident"
