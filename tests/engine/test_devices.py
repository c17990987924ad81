"""Devices and dtypes: a run computes where the model lives, low precision stays close to
float32, and a device or dtype this machine cannot run is a one-line error naming the fix.

CI has no GPU, so two checks stand in for a GPU run:

* :class:`DeviceAudit` records every tensor the library creates without saying where
  (``torch.zeros(n)`` with no ``device=``). On a GPU such a tensor lands on the CPU: a device
  mismatch, or a silent copy to the host and back. A run of every entry point must record none.
* the output checks run on every device this machine has: the CPU here, CUDA and MPS where
  they exist (``pytest tests/engine/test_devices.py`` on a GPU machine runs them there).

Low precision against float32, on the tiny fixtures (the tolerances docs/performance.md states):
the same active features but for a few at the threshold, edges within a fraction of the
graph's largest edge over the nodes both graphs have, the same features selected.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from pipeline import testing
from pipeline.analysis import dashboards as D
from pipeline.analysis.evaluation import evaluate
from pipeline.devices import (
    DeviceError,
    arithmetic_environment,
    check_device_dtype,
    mkl_cbwr_mode,
    parse_dtype,
    pin_cpu_arithmetic,
    same_device,
)
from pipeline.engine.attribution import attribute
from pipeline.engine.interventions import Scale
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.store import Graph, GraphStoreMismatchError
from pipeline.run.config import RuntimeConfig
from pipeline.transcoders import load_transcoders
from tests.analysis.evaluation_fixtures import spec_for, tiny_setup

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"

#: low precision against float32 on the tiny fixtures: largest edge difference over the nodes
#: both graphs have, as a fraction of float32's largest edge (measured: bfloat16 <= 9.5e-3,
#: float16 <= 1.5e-3; the unit roundoffs are 3.9e-3 and 4.9e-4)
EDGE_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
#: active features that agree (intersection over union; a feature at its threshold may flip;
#: measured >= 0.988)
ACTIVE_AGREEMENT = 0.97
#: of float32's selected features with max_feature_nodes, the share low precision selects too
#: (measured >= 0.95: one of 20 swapped for a near tie)
SELECTED_AGREEMENT = 0.9
MAX_FEATURE_NODES = 20


def _available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return torch.backends.mps.is_available()
    return True


#: every device kind; those this machine lacks are skipped (and show as skipped)
DEVICES = [
    pytest.param(d, marks=pytest.mark.skipif(not _available(d), reason=f"no {d} device here"))
    for d in ("cpu", "cuda", "mps")
]


class DeviceAudit(TorchFunctionMode):
    """Records tensors created, by code under ``roots``, without a ``device=``.

    ``found``: (file relative to its root's parent, line, function) of each such creation.
    ``as_tensor`` / ``asarray`` of a tensor keep its device and are not recorded.
    """

    def __init__(self, roots: tuple[Path, ...] = (PIPELINE,)):
        super().__init__()
        self.roots = tuple(str(r) for r in roots)
        self.found: set[tuple[str, int, str]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            keeps_device = func in (torch.as_tensor, torch.asarray) and args and isinstance(args[0], torch.Tensor)
            caller = sys._getframe(1).f_code.co_filename
            root = next((r for r in self.roots if caller.startswith(r)), None)
            if root is not None and not keeps_device:
                where = str(Path(caller).relative_to(Path(root).parent))
                self.found.add((where, sys._getframe(1).f_lineno, func.__name__))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    out = {}
    for arch in ("gpt2", "llama", "gemma2"):
        out[arch] = testing.make_tiny_model(root / arch, arch=arch, n_layers=3, d_model=16, n_heads=2, n_ctx=32)
    common = dict(n_layers=3, d_model=16, d_transcoder=24, density=0.3)
    out["plt_skip"] = testing.make_random_plt(root / "plt_skip", activation="jump_relu", skip=True, **common)
    out["clt"] = testing.make_random_clt(root / "clt", skip=True, **common)
    return out


def prompt_for(model_dir) -> str:
    return " ".join(testing.vocabulary_words(model_dir)[3:10])


# ---------------------------------------------------------------------------- where tensors go
def test_the_audit_records_a_tensor_created_without_a_device():
    here = Path(__file__).resolve().parent
    with DeviceAudit(roots=(here,)) as audit:
        torch.zeros(3)
        ones = torch.ones(2, device="cpu")
        torch.as_tensor(ones)  # keeps its tensor's device
    assert {(func, where) for where, _, func in audit.found} == {("zeros", f"{here.name}/{Path(__file__).name}")}


@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
def test_every_tensor_a_run_creates_says_where_it_goes(dirs, tmp_path, kind):
    """Attribution (all rows and influence-ranked), interventions in every mode, steered
    generation, the replacement run and dashboards: no tensor created without a device."""
    model = ReplacementModel.from_pretrained(dirs["gpt2"], dirs[kind], lazy_encoder=True)
    eager = ReplacementModel.from_pretrained(dirs["gpt2"], dirs[kind])
    prompt = prompt_for(dirs["gpt2"])
    rng = random.Random(0)
    words = testing.vocabulary_words(dirs["gpt2"])
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(12)]
    with DeviceAudit() as audit:
        attribute(prompt, model, store=tmp_path / "all.zarr", verbose=False, batch_size=8)
        attribute(prompt, model, store=tmp_path / "top.zarr", verbose=False, batch_size=4, max_feature_nodes=6)
        model.get_activations(prompt)
        model.run_replacement(prompt)
        ivs = [(0, -1, 3, Scale(0)), (1, slice(2, None), 4, 2.0)]
        eager.feature_intervention(prompt, ivs)
        eager.feature_intervention(prompt, ivs, freeze_attention=False, errors="frozen")
        eager.feature_intervention(prompt, ivs[:1], direct_effects=True)
        eager.feature_intervention(prompt, ivs[:1], constrained_layers=range(0, 2))
        eager.feature_intervention_generate(prompt, [(0, slice(3, None), 3, Scale(-2))], max_new_tokens=3)
        eager.feature_intervention_generate(prompt, ivs, max_new_tokens=2, do_sample=True, seed=0, use_kv_cache=False)
        cfg = D.DashboardConfig(top_k=3, n_quantiles=2, examples_per_quantile=2, n_logits=4, batch_tokens=32)
        D.compute_dashboards(eager, corpus, tmp_path / "dash.zarr", cfg, progress=False)
    assert not audit.found, "tensors created without a device: " + ", ".join(
        f"{f}:{line} ({fn})" for f, line, fn in sorted(audit.found)
    )


def test_the_intervene_stages_evaluation_says_where_its_tensors_go(tiny_gpt2_dir, plt_dir, tmp_path):
    """The circuit checks (top-k ablations, faithfulness, swap / steer / ablate experiments with
    their baselines and generation) create no tensor without a device either."""
    model, prompt, donor, graph = tiny_setup(tiny_gpt2_dir, plt_dir, tmp_path / "g.zarr")
    spec = spec_for(model, prompt, donor)
    with DeviceAudit() as audit:
        evaluate(model, graph, spec)
    assert not audit.found, f"tensors created without a device: {sorted(audit.found)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "resident"])
def test_every_output_of_a_run_lives_on_the_model_device(dirs, tmp_path, device, lazy):
    model = ReplacementModel.from_pretrained(dirs["llama"], dirs["clt"], device=device, lazy_encoder=lazy)
    dev = model.device
    assert dev.type == device and same_device(model.transcoders.device, dev)
    prompt = prompt_for(dirs["llama"])

    def on_device(what: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            assert t.device == dev, f"{what} is on {t.device}, the model on {dev}"

    cap = model.capture(prompt)
    on_device("capture", *(getattr(cap, f) for f in cap.__dataclass_fields__))
    on_device("get_activations", *model.get_activations(prompt))
    on_device("run_replacement", model.run_replacement(prompt))
    feats = np.array([0, 5, 7])
    on_device(
        "encoder rows",
        model.transcoders.encoder_vectors(1, feats),
        model.transcoders.encoder_vectors(1, torch.tensor(feats)),
    )
    on_device(
        "decoder rows",
        model.transcoders.decoder_vectors(0, feats),
        model.transcoders.decoder_vectors(2, torch.tensor(feats)),
    )
    ivs = [(0, -1, 3, Scale(0)), (1, slice(2, None), 4, 2.0)]
    on_device("feature_intervention", *model.feature_intervention(prompt, ivs))
    on_device("feature_intervention (sparse)", *model.feature_intervention(prompt, ivs, sparse=True))
    out = model.feature_intervention_generate(prompt, ivs, max_new_tokens=3)
    on_device("feature_intervention_generate", out.tokens, out.logits, out.activations)
    graph = attribute(prompt, model, store=tmp_path / "g.zarr", verbose=False, batch_size=8)
    assert graph.attrs["device"] == str(dev) and graph.n_selected > 0
    donor = " ".join(testing.vocabulary_words(dirs["llama"])[12:16])
    report = evaluate(model, graph, spec_for(model, prompt, donor))  # the intervene stage's checks
    assert report["experiments"] and report["top_features"]["rows"]


# ---------------------------------------------------------------------------- low precision
_GRAPHS: dict[tuple, Graph] = {}


def _graph(dirs, tmp_path_factory, arch: str, kind: str, dtype: torch.dtype, mfn: int | None) -> Graph:
    """One attribution graph per (fixture, dtype, max_feature_nodes), computed once per session."""
    key = (arch, kind, dtype, mfn)
    if key not in _GRAPHS:
        model = ReplacementModel.from_pretrained(dirs[arch], dirs[kind], dtype=dtype)
        store = tmp_path_factory.mktemp("lowp") / "g.zarr"
        _GRAPHS[key] = attribute(
            prompt_for(dirs[arch]), model, store=store, verbose=False, batch_size=8, max_feature_nodes=mfn
        )
    return _GRAPHS[key]


def _node_ids(graph: Graph) -> list[tuple]:
    """What each graph-order node is: ("f", layer, pos, feature), ("e", layer, pos), ("t", pos),
    ("l", token): the same node in two graphs has the same id."""
    ids: list[tuple] = [("f", *map(int, graph.active_features[i])) for i in graph.selected_features]
    ids += [("e", layer, pos) for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    ids += [("t", pos) for pos in range(graph.n_pos)]
    ids += [("l", int(t)) for t in graph.logit_tokens]
    return ids


def _features(graph: Graph, which: np.ndarray | None = None) -> set[tuple[int, int, int]]:
    rows = graph.active_features if which is None else graph.active_features[which]
    return {tuple(map(int, r)) for r in rows}


def edge_difference(ref: Graph, low: Graph) -> float:
    """max |A_low - A_ref| over the nodes both graphs have, / max |A_ref|.

    Error nodes at a (layer, position) where the active features differ are left out: a
    feature that fires in one graph and not the other moves its output into that error node,
    which is a different node, not a less precise one.
    """
    flipped = {(layer, pos) for layer, pos, _ in _features(ref) ^ _features(low)}
    ids_ref, index_low = _node_ids(ref), {n: i for i, n in enumerate(_node_ids(low))}
    shared = [(i, index_low[n]) for i, n in enumerate(ids_ref) if n in index_low]
    rows_ref, rows_low = (np.array(s) for s in zip(*shared))
    keep = np.array([not (ids_ref[i][0] == "e" and ids_ref[i][1:] in flipped) for i in rows_ref])
    A, B = ref.adjacency_dense(), low.adjacency_dense()
    diff = np.abs(A[np.ix_(rows_ref, rows_ref[keep])] - B[np.ix_(rows_low, rows_low[keep])])
    return float(diff.max() / np.abs(A).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["plt_skip", "clt"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_low_precision_attribution_stays_within_tolerance_of_float32(dirs, tmp_path_factory, arch, kind, dtype):
    ref = _graph(dirs, tmp_path_factory, arch, kind, torch.float32, None)
    low = _graph(dirs, tmp_path_factory, arch, kind, dtype, None)
    a, b = _features(ref), _features(low)
    assert len(a & b) / len(a | b) >= ACTIVE_AGREEMENT
    assert edge_difference(ref, low) <= EDGE_TOLERANCE[dtype]

    ref = _graph(dirs, tmp_path_factory, arch, kind, torch.float32, MAX_FEATURE_NODES)
    low = _graph(dirs, tmp_path_factory, arch, kind, dtype, MAX_FEATURE_NODES)
    selected_ref, selected_low = _features(ref, ref.selected_features), _features(low, low.selected_features)
    assert len(selected_ref & selected_low) / len(selected_ref) >= SELECTED_AGREEMENT


def test_the_store_records_the_dtype_and_keeps_float32_values(dirs, tmp_path_factory, tmp_path):
    low = _graph(dirs, tmp_path_factory, "gpt2", "clt", torch.bfloat16, None)
    assert low.attrs["dtype"] == "torch.bfloat16" and low.attrs["device"] == "cpu"
    assert low.read_batch(0)["values"].dtype == np.float32
    assert low.activation_values.dtype == np.float32 and low.table("error_vectors").dtype == np.float32
    # the dtype is part of the store's key: a float32 run does not resume a bfloat16 store
    model = ReplacementModel.from_pretrained(dirs["gpt2"], dirs["clt"])
    with pytest.raises(GraphStoreMismatchError):
        attribute(prompt_for(dirs["gpt2"]), model, store=low.path, verbose=False)


# ---------------------------------------------------------------------------- clear errors
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_cuda_without_cuda_is_one_line_naming_the_fix_before_anything_loads(dirs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (
        lambda: check_device_dtype("cuda"),
        lambda: ReplacementModel.from_pretrained(dirs["gpt2"], dirs["clt"], device="cuda"),
        lambda: ReplacementModel.from_pretrained("no/such-model", "no/such-transcoders", device="cuda:0"),
        lambda: load_transcoders(dirs["clt"], device="cuda", dtype="bfloat16"),
    ):
        with pytest.raises(DeviceError, match="asked for, but") as info:
            call()
        assert _one_line(info).endswith("or use device cpu")


@pytest.fixture
def old_gpu(monkeypatch):
    """A machine whose one GPU is a V100 (compute capability 7.0: no bfloat16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))


def test_a_dtype_the_gpu_cannot_run_names_those_it_can(old_gpu):
    with pytest.raises(DeviceError) as info:
        check_device_dtype("cuda", "bfloat16")
    assert _one_line(info) == (
        "Tesla V100-SXM2-16GB (compute capability 7.0) cannot compute in bfloat16 (it needs 8.0, "
        "Ampere or newer): load the model in float16 or float32"
    )
    assert check_device_dtype("cuda", torch.float16) == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"this machine has 1 GPU\(s\) \(cuda:0..cuda:0\)"):
        check_device_dtype("cuda:1", "float32")


def test_float64_on_the_apple_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(DeviceError, match="cannot compute in float64: load the model in float32"):
        check_device_dtype("mps", "float64")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no Apple GPU"):
        check_device_dtype("mps", "float32")


@pytest.mark.parametrize(
    "device, dtype, match",
    [
        ("gpu", "float32", "device 'gpu' is not a device name: use cpu, cuda, cuda:N or mps"),
        ("meta", "float32", "device 'meta' is not supported"),
        ("cpu", "bf16", "dtype 'bf16' is not one of float32, float64, bfloat16, float16"),
        ("cpu", torch.int64, "dtype torch.int64 cannot hold a model"),
    ],
)
def test_unknown_device_and_dtype_names_are_refused(device, dtype, match):
    with pytest.raises(DeviceError, match=match) as info:
        check_device_dtype(device, dtype)
    _one_line(info)


def test_every_dtype_name_runs_on_the_cpu():
    for name in ("float32", "float64", "bfloat16", "float16", "torch.bfloat16"):
        assert check_device_dtype("cpu", name) == torch.device("cpu")
        assert parse_dtype(name) == getattr(torch, name.removeprefix("torch."))


def test_transcoders_in_another_dtype_than_the_model_are_refused(dirs):
    model = ReplacementModel.from_pretrained(dirs["gpt2"], dirs["clt"])
    other = load_transcoders(dirs["clt"], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="load both with the same device and dtype") as info:
        ReplacementModel(model.bridge, other)
    _one_line(info)
    with pytest.raises(ValueError, match="load both with the same device and dtype") as info:
        ReplacementModel.from_pretrained("no/such-model", other)  # refused before the model loads
    _one_line(info)


# --- MKL's reproducible mode -------------------------------------------------------------------
def _mkl_mode_in_fresh_python(code: str, env_mode: str | None = None) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter (MKL reads its mode once per process) in the native
    arithmetic; stdout, stderr."""
    env = arithmetic_environment("native")
    if env_mode is not None:
        env["MKL_CBWR"] = env_mode
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip(), proc.stderr


_PIN_THEN_MULTIPLY = (
    "import torch\n"
    "from pipeline.devices import mkl_cbwr_mode, pin_cpu_arithmetic\n"
    "{before}"
    "ok = pin_cpu_arithmetic()\n"
    "torch.randn(40, 50) @ torch.randn(50, 60)\n"
    "print(ok, mkl_cbwr_mode())\n"
)


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch carries no MKL")
def test_native_pinned_before_the_first_product_mkl_computes_in_auto_mode():
    out, err = _mkl_mode_in_fresh_python(_PIN_THEN_MULTIPLY.format(before=""))
    assert out == "True 2"  # MKL_CBWR_AUTO
    assert "MKL" not in err


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch carries no MKL")
def test_pinned_after_a_product_warns_with_the_fix_and_reports_off():
    out, err = _mkl_mode_in_fresh_python(_PIN_THEN_MULTIPLY.format(before="torch.randn(4, 5) @ torch.randn(5, 6)\n"))
    assert out == "False 1"
    assert "MKL_CBWR=AUTO " in err


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch carries no MKL")
def test_a_mode_the_user_set_is_kept():
    out, _ = _mkl_mode_in_fresh_python(_PIN_THEN_MULTIPLY.format(before=""), env_mode="COMPATIBLE")
    assert out == "True 3"


# --- the portable arithmetic -------------------------------------------------------------------
def _in_fresh_python(code: str, arithmetic: str | None) -> tuple[str, str]:
    """Run ``code`` in a fresh interpreter whose environment names ``arithmetic`` (None: no mode)
    and no MKL or torch kernel setting of its own; stdout, stderr."""
    env = arithmetic_environment(arithmetic)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip(), proc.stderr


_PIN_THEN_COMPUTE = (
    "import torch\n"
    "from pipeline.devices import arithmetic_in_force, pin_cpu_arithmetic\n"
    "{before}"
    "ok = pin_cpu_arithmetic()\n"
    "(torch.randn(40, 50) @ torch.randn(50, 60)).softmax(-1).sum()\n"
    "a = arithmetic_in_force()\n"
    "print(ok, a['mode'], a['mkl_cbwr'], a['kernels'])\n"
)


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch carries no MKL")
def test_portable_arithmetic_runs_mkls_compatible_path_and_torchs_baseline_kernels():
    out, err = _in_fresh_python(_PIN_THEN_COMPUTE.format(before=""), "portable")
    assert out == "True portable 3 DEFAULT"  # MKL_CBWR_COMPATIBLE
    assert "not in force" not in err
    out, _ = _in_fresh_python(_PIN_THEN_COMPUTE.format(before=""), "native")
    assert out.startswith("True native 2 ")  # MKL_CBWR_AUTO, this CPU's own kernels


@pytest.mark.skipif(mkl_cbwr_mode() is None, reason="this torch carries no MKL")
def test_the_arithmetic_no_one_names_is_the_portable_one():
    out, _ = _in_fresh_python(_PIN_THEN_COMPUTE.format(before=""), None)
    assert out == "True portable 3 DEFAULT"


def test_portable_arithmetic_pinned_after_a_kernel_warns_with_the_fix():
    native, _ = _in_fresh_python(_PIN_THEN_COMPUTE.format(before=""), "native")
    if native.endswith(" DEFAULT"):  # this process runs portable: ask a native one what the CPU has
        pytest.skip("this CPU runs the baseline kernels anyway")
    out, err = _in_fresh_python(_PIN_THEN_COMPUTE.format(before="torch.randn(5).exp().sum()\n"), "portable")
    assert out.startswith("False portable")
    assert "ATEN_CPU_CAPABILITY=default" in err


def test_an_unknown_arithmetic_is_refused_naming_the_modes():
    with pytest.raises(ValueError, match="native.*portable"):
        pin_cpu_arithmetic("fast")
    with pytest.raises(ValueError, match="runtime.arithmetic"):
        RuntimeConfig(arithmetic="fast")


def test_portable_training_gives_the_same_bytes_in_two_processes(tmp_path):
    code = (
        "import hashlib, sys\n"
        "from pipeline.devices import pin_cpu_arithmetic\n"
        "pin_cpu_arithmetic()\n"
        "from pipeline.organism.config import ModelConfig, TrainConfig\n"
        "from pipeline.organism.train_model import train_model\n"
        "from pipeline.organism.world import WorldConfig, make_world\n"
        "world = make_world(WorldConfig(n_states=3, cities_per_state=2, held_out_per_state=1, languages=1))\n"
        "model = ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=12)\n"
        "train_model(world, model, TrainConfig(steps=20, batch_size=16), sys.argv[1], progress=False)\n"
        "print(hashlib.sha256(open(sys.argv[1] + '/model.safetensors', 'rb').read()).hexdigest())\n"
    )
    digests = [_in_fresh_python(code.replace("sys.argv[1]", repr(str(tmp_path / n))), "portable")[0] for n in "ab"]
    assert digests[0] == digests[1] and len(digests[0]) == 64
