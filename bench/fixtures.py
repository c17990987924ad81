"""Benchmark fixtures: GPT-2-small- and Gemma-2-2B-shaped random models and realistic 16k-feature PLTs.

Built once, with the repo's own fixture helpers (``pipeline.testing``), and cached under a
work directory (default ``bench/.work/``, git-ignored). A cached fixture is reused only when
its recorded parameters match; otherwise it is rebuilt.

    python bench/fixtures.py [--workdir DIR] [--only NAME ... | all]

``all`` builds the CPU benchmarks' fixtures (gpt2small, scale); the others only by name.

Fixtures
--------
``gpt2small``: GPT-2 small's shape (12 layers, d_model 768, 12 heads, n_ctx 1024, vocabulary
50257: the toy words of ``pipeline.testing`` padded with filler words ``w<i>``), random init,
with per-layer JumpReLU transcoders of 16384 features at density 0.004 (≈ 65 active features
per token per layer, as real transcoders fire; docs/performance.md).

``scale``: a cheap model for the scale case (see ``bench/attribution.py``): GPT-2 layout with
few layers and a small d_model, long context, and PLTs with many features firing per token,
so that a prompt has >= 110k nodes (a dense float32 adjacency >= 48 GB).

``gemma2_2b``: Gemma-2-2B's shape and architecture (26 layers, d_model 2304, 8 heads of width
256 with 4 key-value heads, d_mlp 9216, vocabulary 256000, context 8192, sliding window 4096,
soft-capping: 2.6 B parameters), random init, saved as a Hugging Face Gemma-2 checkpoint in
bfloat16 (5.2 GB); per-layer JumpReLU transcoders of 16384 features at density 0.005 (≈ 82
active per token per layer, in GemmaScope 16k's L0 range) in circuit-tracer's safetensors
layout, bfloat16 (3.9 GB). Built for ``bench/gpu.py`` (a few minutes and ≈ 25 GB of memory).
``tiny_gpt2`` / ``tiny_gemma2``: the same layouts at 2 layers, d_model 64, for ``gpu.py --quick``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_WORKDIR = BENCH_DIR / ".work"


@dataclass(frozen=True)
class FixtureSpec:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_ctx: int
    vocab_size: int  # including the 4 special tokens
    d_transcoder: int
    density: float
    activation: str = "jump_relu"
    seed: int = 0
    # added for the Gemma-2 shape; at their defaults they stay out of the cache key, so the
    # caches of the older fixtures stay valid
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    d_mlp: int | None = None
    head_dim: int | None = None
    file_dtype: str = "float32"

    @property
    def features_per_token_layer(self) -> float:
        return self.density * self.d_transcoder

    def params(self) -> dict:
        """The parameters a cached fixture is checked against."""
        defaults = {"arch": "gpt2", "n_kv_heads": None, "d_mlp": None, "head_dim": None, "file_dtype": "float32"}
        return {k: v for k, v in asdict(self).items() if k not in defaults or v != defaults[k]}


GPT2_SMALL = FixtureSpec(
    name="gpt2small",
    n_layers=12,
    d_model=768,
    n_heads=12,
    n_ctx=1024,
    vocab_size=50257,
    d_transcoder=16384,
    density=0.004,
)

# The scale case: dense adjacency >= 48 GB needs >= ~110k nodes. Nodes here are mostly
# features: 2 layers x 1023 positions x ~60 features; the backward passes are cheap (d_model 64).
SCALE = FixtureSpec(
    name="scale",
    n_layers=2,
    d_model=64,
    n_heads=2,
    n_ctx=1024,
    vocab_size=64,
    d_transcoder=16384,
    density=0.004,
)

GEMMA2_2B = FixtureSpec(
    name="gemma2_2b",
    arch="gemma2",
    n_layers=26,
    d_model=2304,
    n_heads=8,
    n_kv_heads=4,
    head_dim=256,
    d_mlp=9216,
    n_ctx=8192,
    vocab_size=256000,
    d_transcoder=16384,
    density=0.005,
    file_dtype="bfloat16",
)

# the layouts of gpt2small and gemma2_2b at a size that attributes in seconds on a CPU
TINY_GPT2 = FixtureSpec(
    name="tiny_gpt2", n_layers=2, d_model=64, n_heads=4, n_ctx=128, vocab_size=256, d_transcoder=1024, density=0.01
)
TINY_GEMMA2 = FixtureSpec(
    name="tiny_gemma2",
    arch="gemma2",
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    d_mlp=256,
    n_ctx=128,
    vocab_size=256,
    d_transcoder=1024,
    density=0.01,
    file_dtype="bfloat16",
)

SPECS = {s.name: s for s in (GPT2_SMALL, SCALE, GEMMA2_2B, TINY_GPT2, TINY_GEMMA2)}


def scale_spec(density: float) -> FixtureSpec:
    """The scale model with transcoders of another density (same model, other features)."""
    if density == SCALE.density:
        return SCALE
    return FixtureSpec(**{**asdict(SCALE), "name": f"scale_d{density:g}", "density": density})


def vocab_words(vocab_size: int) -> list[str]:
    """The toy words of ``pipeline.testing`` then filler words, ``vocab_size`` - 4 in all."""
    from pipeline.testing import DEFAULT_WORDS, SPECIAL_TOKENS

    words = list(DEFAULT_WORDS)
    n = vocab_size - len(SPECIAL_TOKENS)
    i = 0
    while len(words) < n:
        words.append(f"w{i}")
        i += 1
    return words[:n]


@dataclass
class Fixture:
    spec: FixtureSpec
    model_dir: Path
    transcoder_dir: Path

    def prompt(self, n_tokens: int) -> str:
        return prompt(n_tokens)


def prompt(n_tokens: int) -> str:
    """A deterministic prompt of ``n_tokens`` tokens including BOS (n_tokens - 1 toy words)."""
    from pipeline.testing import DEFAULT_WORDS

    base = "the capital of the state containing dallas is austin . la capitale de texas est".split()
    words = [base[i] if i < len(base) else DEFAULT_WORDS[(7 * i) % len(DEFAULT_WORDS)] for i in range(n_tokens - 1)]
    return " ".join(words)


def _disk_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(spec: FixtureSpec, workdir: Path = DEFAULT_WORKDIR, *, verbose: bool = True) -> Fixture:
    """Build (or reuse) the model and transcoders of ``spec`` under ``workdir/spec.name``."""
    import torch

    from pipeline.testing import make_random_plt, make_tiny_model

    root = Path(workdir) / spec.name
    marker = root / "fixture.json"
    fixture = Fixture(spec, root / "model", root / "transcoders")
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec.params():
        return fixture
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    if verbose:
        print(f"[fixtures] building {spec.name} under {root} ...", flush=True)
    dtype = getattr(torch, spec.file_dtype)
    make_tiny_model(
        fixture.model_dir,
        arch=spec.arch,
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads,
        d_mlp=spec.d_mlp,
        head_dim=spec.head_dim,
        n_ctx=spec.n_ctx,
        vocab_words=vocab_words(spec.vocab_size),
        seed=spec.seed,
        dtype=dtype,
    )
    make_random_plt(
        fixture.transcoder_dir,
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        d_transcoder=spec.d_transcoder,
        activation=spec.activation,
        density=spec.density,
        seed=spec.seed,
        dtype=dtype,
    )
    info = {
        "spec": spec.params(),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "model_bytes": _disk_size(fixture.model_dir),
        "transcoder_bytes": _disk_size(fixture.transcoder_dir),
    }
    marker.write_text(json.dumps(info, indent=1))
    if verbose:
        print(f"[fixtures] {spec.name}: {json.dumps(info)}", flush=True)
    return fixture


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--only", nargs="+", choices=[*SPECS, "all"], default=["all"])
    args = ap.parse_args(argv)
    for name, spec in SPECS.items():
        if name in args.only or ("all" in args.only and name in ("gpt2small", "scale")):
            fx = build(spec, args.workdir)
            print(f"{name}: model {fx.model_dir}  transcoders {fx.transcoder_dir}")


if __name__ == "__main__":
    main()
