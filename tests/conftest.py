"""Shared, session-scoped fixtures: tiny models and random transcoders built once per run.

All sizes match the tiny models (2 layers, d_model 16) so any model fixture pairs with any
transcoder fixture. Builders are deterministic (seed 0), see ``pipeline.testing``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `pytest` run from a checkout without `pip install -e .` must still import the package
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipeline import testing  # noqa: E402
from pipeline.devices import pin_cpu_arithmetic  # noqa: E402

# before the first matrix product of the run: tests that compare two trainings bit for bit
# hold on every CPU MKL serves
pin_cpu_arithmetic()

N_LAYERS = 2
D_MODEL = 16
D_TRANSCODER = 64


@pytest.fixture(autouse=True, scope="session")
def _digest_cache_of_this_run(tmp_path_factory):
    """Weight digests are remembered in a database of this run (pipeline.digests), never in the
    user's cache: a test sees no entry another run left."""
    import os

    from pipeline.digests import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("digest-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: threads only contend (10x slower on a loaded 2-core machine). A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """GPT-2 (LayerNorm), 2 layers, d_model 16; its tokenizer does not add BOS itself."""
    return testing.make_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2", n_layers=N_LAYERS, d_model=D_MODEL)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Llama (RMSNorm, rotary, GQA), 2 layers, d_model 16; its tokenizer adds BOS."""
    return testing.make_tiny_llama(tmp_path_factory.mktemp("models") / "llama", n_layers=N_LAYERS, d_model=D_MODEL)


@pytest.fixture(scope="session")
def plt_dir(tmp_path_factory):
    """Per-layer ReLU transcoders, 64 features, ~10 % active."""
    return testing.make_random_plt(
        tmp_path_factory.mktemp("transcoders") / "plt",
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TRANSCODER,
        activation="relu",
    )


@pytest.fixture(scope="session")
def plt_skip_dir(tmp_path_factory):
    """Per-layer JumpReLU transcoders with a W_skip term."""
    return testing.make_random_plt(
        tmp_path_factory.mktemp("transcoders") / "plt_skip",
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TRANSCODER,
        activation="jump_relu",
        skip=True,
        seed=1,
    )


@pytest.fixture(scope="session")
def clt_dir(tmp_path_factory):
    """Cross-layer JumpReLU transcoder (circuit-tracer's W_enc_{i} / W_dec_{i} files)."""
    return testing.make_random_clt(
        tmp_path_factory.mktemp("transcoders") / "clt",
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TRANSCODER,
        activation="jump_relu",
        seed=2,
    )


@pytest.fixture(scope="session")
def gemmascope_dir(tmp_path_factory):
    """GemmaScope-style per-layer JumpReLU transcoders: layer_{i}/params.npz, W_enc transposed."""
    return testing.make_random_plt(
        tmp_path_factory.mktemp("transcoders") / "gemmascope",
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_transcoder=D_TRANSCODER,
        activation="jump_relu",
        gemmascope=True,
        seed=3,
    )
