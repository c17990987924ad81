"""The organism's optimizer and its portability: AdamW with a correctly rounded square root, and
the same trained bytes on another CPU (an Intel Haswell emulated by qemu) in the portable
arithmetic, where torch's own AdamW gave other bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.devices import arithmetic_environment
from pipeline.organism.optim import PortableAdamW, exact_sqrt

ROOT = Path(__file__).resolve().parents[2]


def test_exact_sqrt_is_the_correctly_rounded_float32_root():
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 1e3
    expected = np.sqrt(x.numpy())  # IEEE-754 sqrt: correctly rounded on every CPU
    assert exact_sqrt(x).dtype == torch.float32
    assert np.array_equal(exact_sqrt(x).numpy(), expected)


def test_portable_adamw_takes_torchs_adamw_steps():
    def train(opt_cls) -> torch.Tensor:
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 4)
        opt = opt_cls(
            [{"params": [lin.weight], "weight_decay": 0.1}, {"params": [lin.bias], "weight_decay": 0.0}],
            lr=1e-2,
            betas=(0.9, 0.98),
        )
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(50):
            opt.zero_grad()
            lin(x).pow(2).mean().backward()
            opt.step()
        return torch.cat([lin.weight.detach().flatten(), lin.bias.detach()])

    ours, torchs = train(PortableAdamW), train(torch.optim.AdamW)
    assert not torch.equal(ours, train(lambda p, **kw: PortableAdamW(p, **{**kw, "lr": 2e-2})))  # lr matters
    torch.testing.assert_close(ours, torchs, rtol=1e-5, atol=1e-6)  # only the root's last bit differs


_TRAIN_TINY_ORGANISM = """
import hashlib, sys
from pathlib import Path
from pipeline.devices import pin_cpu_arithmetic
pin_cpu_arithmetic()
from pipeline.organism.build import OrganismConfig, build_organism
from pipeline.organism.config import ModelConfig, TrainConfig, TranscoderTrainConfig
from pipeline.organism.world import WorldConfig
out = Path(sys.argv[1])
tc = dict(d_transcoder=32, steps=30, batch_size=128, warmup_steps=5)
cfg = OrganismConfig(
    world=WorldConfig(n_states=2, cities_per_state=3, held_out_per_state=1),
    model=ModelConfig(d_model=16, n_heads=2),
    train=TrainConfig(steps=20, batch_size=16, warmup_steps=5),
    plt=TranscoderTrainConfig(**tc),
    clt=TranscoderTrainConfig(skip=False, **tc),
    threads=2,
)
build_organism(out, cfg, progress=False)
for f in sorted(out.glob("*/*.safetensors")):
    print(f.relative_to(out), hashlib.md5(f.read_bytes()).hexdigest())
"""


def _digests(out: Path, emulate: str | None) -> dict[str, str]:
    """Train the tiny organism into ``out`` in a fresh process in the portable arithmetic, on this
    CPU or under ``qemu-x86_64 -cpu EMULATE``; {file: md5}."""
    env = arithmetic_environment("portable")
    cmd = [sys.executable, "-c", _TRAIN_TINY_ORGANISM, str(out)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate, *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(line.split() for line in proc.stdout.splitlines())


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("qemu-x86_64") is None and not os.environ.get("CI"),
    reason="qemu-x86_64 (Debian's qemu-user) is not installed: no other CPU to train on",
)
def test_portable_organism_trains_the_same_bytes_on_an_emulated_intel_haswell(tmp_path):
    """This machine's CPU against an Intel Haswell (AVX2, no AVX-512) that qemu emulates: MKL and
    torch see another vendor and instruction set; with the portable arithmetic the model and
    both transcoder sets must come out byte for byte the same (torch's own AdamW, whose float32
    root goes through MKL's vector math, gave another PLT and CLT, and another model)."""
    host = _digests(tmp_path / "host", None)
    emulated = _digests(tmp_path / "haswell", "Haswell")
    assert len(host) == 7 and "model/model.safetensors" in host  # model, 2 PLT layers, 4 CLT tensors
    assert emulated == host


def test_with_seed_seeds_every_part_that_draws_and_keeps_the_rest():
    from dataclasses import asdict

    from pipeline.organism.build import OrganismConfig

    base = OrganismConfig(threads=1)
    seeded = base.with_seed(7)
    assert {seeded.world.seed, seeded.train.seed, seeded.plt.seed, seeded.clt.seed} == {7}
    assert (seeded.plt.skip, seeded.clt.skip, seeded.clt.threads) == (base.plt.skip, base.clt.skip, 1)
    assert asdict(base.with_seed(base.world.seed)) == asdict(base)
