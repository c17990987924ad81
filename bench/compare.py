"""Side-by-side benchmark against circuit-tracer 0.5.0: exactness, pruning, graph JSON, interventions, speed, scale.

    python bench/compare.py            # everything (creates circuit-tracer's venv on first use)
    python bench/compare.py --quick    # tiny fixtures only (exactness, pruning, JSON, interventions), < 4 min
    python bench/compare.py --only interventions --out bench/results/compare-interventions.json

Run it with the project's environment active. It builds the shared fixtures once under a
git-ignored work directory (``bench/.work/compare``), then runs circuit-tracer
(``bench/ct_runner.py`` in ``bench/.ct-venv``, made by ``bench/circuit_tracer_env.sh``) and our
engine (this file with ``--worker``, in our venv), each as its own subprocess, on the same token
ids and settings, one after the other (never concurrently), and prints one table. Results go to
``bench/results/compare.json`` (``compare-quick.json`` for ``--quick``) with the machine, the
versions, the date and the load average.

Fixtures (all float32, random, seeded; built with ``pipeline.testing``):

* tiny: GPT-2 and Llama models (2 layers, d_model 16) with per-layer ReLU transcoders, per-layer
  JumpReLU transcoders with a skip matrix, and a JumpReLU cross-layer transcoder (64 features).
* gpt2small: GPT-2 small's shape (12 layers, d_model 768, vocabulary 50257) with 16384-feature
  JumpReLU PLTs and a 16384-feature JumpReLU CLT, density 0.004 (``bench/fixtures.py``'s spec).
* scale: 2 layers, d_model 64, 1024 positions, 16384-feature PLTs at density 0.004: many nodes
  per token for cheap backward passes (``bench/fixtures.py``'s ``scale`` spec).

Interventions (tiny fixtures): circuit-tracer's ``feature_intervention`` and
``feature_intervention_generate`` with its defaults against ours with ours, on the same absolute
values (ablation, ×−2 with frozen and free attention, 10× in constrained layer ranges, greedy
generation with open-ended ×−2); ``max |Δlogit| / max |logit|`` per case (goal <= 1e-5), and
the same for ours with ``errors="frozen"`` (the local replacement model) to show what the
option changes (``intervention_cases``, ``intervention_rows``).

Exactness is checked with ``max_feature_nodes`` unset (all features) and set. The adjacency is
compared over every entry of the rows and columns both graphs have; ``rel`` is
``max |ours - theirs| / max |theirs|`` over those entries (the goal is <= 1e-5 in float32),
``rel_entry`` the largest elementwise relative difference among entries with
``|theirs| >= 1e-3 max |theirs|``.

Speed and memory: wall time of ``attribute`` and peak RSS (``ru_maxrss``) of the process, model
loading included, each engine in a fresh process. The machine is shared, so ratios are measured
in one invocation, the two engines alternating; the load average is recorded with them. Our
engine remembers its weights' digests across processes (``pipeline/digests.py``), so the section
first hashes each weight set once in an untimed run and reports that time beside the rows
(``digest_first_s``: what a machine's first run of a weight set pays on top).

Scale: prompt lengths double until a run fails, exceeds the time cap (``--scale-cap-s``) or the
address-space cap (``--mem-cap-gb``, RLIMIT_AS, so an allocation fails cleanly instead of the
kernel's OOM killer hitting other processes).

Where the adjacency differs, the differing columns are checked by intervention on the frozen
model (the test suite's ``FrozenReference``). ``--zero-bos-errors`` runs our engine with
``attribute(..., zero_bos_errors=True)`` (zero BOS-position error vectors, as circuit-tracer
does) in the exactness sections, to show that this alone explains the differences. Sections can
be rerun alone: ``--only`` them (or ``--skip`` the others) and ``--reuse`` an earlier results
JSON for the rest (``--scale-append`` keeps earlier scale rows of other lengths).
A full run takes about 66 minutes on 2 busy cores (2026-11-26, load average 4-10);
``--quick`` about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_WORKDIR = BENCH / ".work" / "compare"
CT_VENV = BENCH / ".ct-venv"
CT_RUNNER = BENCH / "ct_runner.py"
RESULTS = BENCH / "results"
SCAN = "circuit-pipeline-bench"
SECTION_KEYS = {  # report sections, in table order, and the report keys each one fills
    "exactness": ["exactness", "exactness_status", "verify_by_intervention", "versions"],
    "interventions": ["interventions", "interventions_status", "interventions_versions"],
    "big-exactness": ["exactness_big", "exactness_big_settings"],
    "speed": ["speed", "speed_settings"],
    "scale": ["scale", "scale_settings", "scale_settings_earlier"],
}

BASE_WORDS = (
    "the capital of the state containing dallas is austin . la capitale de texas est "
    "big city of the south in texas and the river"
).split()


# ============================================================================================
# Fixtures
# ============================================================================================
@dataclass(frozen=True)
class Setup:
    """One (model, transcoders) pair."""

    name: str
    model_dir: str
    transcoder_dir: str


def _cached(root: Path, params: dict, build) -> Path:
    """Build into ``root`` unless its marker records the same parameters."""
    marker = root / "fixture.json"
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    build(root)
    marker.write_text(json.dumps({"params": params, "build_s": round(time.perf_counter() - t0, 1)}))
    return root


TINY = dict(n_layers=2, d_model=16, d_transcoder=64, n_ctx=64)


def build_tiny(workdir: Path) -> list[Setup]:
    from pipeline import testing as T

    n, d, k, ctx = TINY["n_layers"], TINY["d_model"], TINY["d_transcoder"], TINY["n_ctx"]
    root = workdir / "tiny"
    models = {
        "gpt2": _cached(
            root / "gpt2", {"kind": "gpt2", **TINY}, lambda p: T.make_tiny_gpt2(p, n_layers=n, d_model=d, n_ctx=ctx)
        ),
        "llama": _cached(
            root / "llama", {"kind": "llama", **TINY}, lambda p: T.make_tiny_llama(p, n_layers=n, d_model=d, n_ctx=ctx)
        ),
    }
    tcs = {
        "plt_relu": _cached(
            root / "plt_relu",
            {"kind": "plt_relu", **TINY},
            lambda p: T.make_random_plt(p, n_layers=n, d_model=d, d_transcoder=k, activation="relu"),
        ),
        "plt_jump_skip": _cached(
            root / "plt_jump_skip",
            {"kind": "plt_jump_skip", **TINY},
            lambda p: T.make_random_plt(
                p, n_layers=n, d_model=d, d_transcoder=k, activation="jump_relu", skip=True, seed=1
            ),
        ),
        "clt_jump": _cached(
            root / "clt_jump",
            {"kind": "clt_jump", **TINY},
            lambda p: T.make_random_clt(p, n_layers=n, d_model=d, d_transcoder=k, activation="jump_relu", seed=2),
        ),
    }
    return [Setup(f"tiny-{m}-{t}", str(models[m]), str(tcs[t])) for m in models for t in tcs]


def _bench_spec(name: str):
    """``bench/fixtures.py``'s spec when that module is there, else the same numbers here."""
    try:
        from bench import fixtures as F  # noqa: WPS433

        return F.SPECS[name], F.vocab_words
    except Exception:  # pragma: no cover - fixtures.py is another engineer's file
        from pipeline.testing import DEFAULT_WORDS, SPECIAL_TOKENS

        @dataclass(frozen=True)
        class Spec:
            name: str
            n_layers: int
            d_model: int
            n_heads: int
            n_ctx: int
            vocab_size: int
            d_transcoder: int
            density: float
            activation: str = "jump_relu"
            seed: int = 0

        specs = {
            "gpt2small": Spec("gpt2small", 12, 768, 12, 1024, 50257, 16384, 0.004),
            "scale": Spec("scale", 2, 64, 2, 1024, 64, 16384, 0.004),
        }

        def vocab_words(size):
            words = list(DEFAULT_WORDS)
            i = 0
            while len(words) < size - len(SPECIAL_TOKENS):
                words.append(f"w{i}")
                i += 1
            return words[: size - len(SPECIAL_TOKENS)]

        return specs[name], vocab_words


def build_big(workdir: Path, name: str, with_clt: bool) -> list[Setup]:
    from pipeline import testing as T

    spec, vocab_words = _bench_spec(name)
    params = spec.params() if hasattr(spec, "params") else asdict(spec)
    root = workdir / name
    model = _cached(
        root / "model",
        {"model": params},
        lambda p: T.make_tiny_gpt2(
            p,
            n_layers=spec.n_layers,
            d_model=spec.d_model,
            n_heads=spec.n_heads,
            n_ctx=spec.n_ctx,
            vocab_words=vocab_words(spec.vocab_size),
            seed=spec.seed,
        ),
    )
    plt = _cached(
        root / "plt",
        {"plt": params},
        lambda p: T.make_random_plt(
            p,
            n_layers=spec.n_layers,
            d_model=spec.d_model,
            d_transcoder=spec.d_transcoder,
            activation=spec.activation,
            density=spec.density,
            seed=spec.seed,
        ),
    )
    setups = [Setup(f"{name}-plt", str(model), str(plt))]
    if with_clt:
        clt = _cached(
            root / "clt",
            {"clt": params},
            lambda p: T.make_random_clt(
                p,
                n_layers=spec.n_layers,
                d_model=spec.d_model,
                d_transcoder=spec.d_transcoder,
                activation=spec.activation,
                density=spec.density,
                seed=spec.seed + 1,
            ),
        )
        setups.append(Setup(f"{name}-clt", str(model), str(clt)))
    return setups


def token_ids(model_dir: str, n_tokens: int) -> tuple[list[int], str]:
    """``n_tokens`` ids, BOS first, and the text they tokenize from (n_tokens - 1 words)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    words = [w for w in BASE_WORDS if w in vocab]
    fillers = sorted((w for w in vocab if w not in tok.all_special_tokens), key=vocab.get)
    seq = [words[i] if i < len(words) else fillers[(7 * i) % len(fillers)] for i in range(n_tokens - 1)]
    text = " ".join(seq)
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
    if len(ids) != n_tokens:
        raise RuntimeError(f"prompt of {n_tokens} tokens came out as {len(ids)}")
    return ids, text


# ============================================================================================
# Our engine, as a subprocess (``--worker JOB.json``), writing what ct_runner.py writes
# ============================================================================================
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(job_path: str) -> None:
    import numpy as np
    import torch

    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(job.get("threads", 2)))
    from pipeline.memory import release_freed_buffers

    release_freed_buffers()  # as `circuit-pipeline attribute` and the pipeline stages do
    import importlib.metadata as md

    device, job_dtype = job.get("device", "cpu"), job.get("dtype", "float32")
    on_gpu = device.startswith("cuda")
    result: dict = {
        "engine": "circuit-pipeline",
        "device": device,
        "dtype": job_dtype,
        "setups": {},
        "versions": {n: md.version(n) for n in ("torch", "transformer-lens", "transformers", "numpy")},
    }

    def save() -> None:
        result["peak_rss_mb"] = _peak_rss_mb()
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out_dir / "result.json")

    from pipeline.analysis.export import create_graph_files
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel
    from pipeline.graph.pruning import prune_graph

    t_start = time.perf_counter()
    for setup in job["setups"]:
        res: dict = {"runs": {}}
        result["setups"][setup["name"]] = res
        sdir = out_dir / setup["name"]
        sdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # encoders on disk, as `circuit-pipeline attribute` and the attribute stage load them
        # (circuit-tracer's load_transcoder_set defaults to lazy encoders too)
        model = ReplacementModel.from_pretrained(
            setup["model_dir"], setup["transcoder_dir"], lazy_encoder=True, device=device, dtype=job_dtype
        )
        # attribute(zero_bos_errors=True) gives the BOS-position error nodes zero output vectors,
        # as circuit-tracer 0.5.0 does (error_vectors[:, zero_positions] = 0)
        zero_bos = bool(job.get("zero_bos_errors"))
        res["zero_bos_errors"] = zero_bos
        res.update(load_s=time.perf_counter() - t0, peak_rss_mb_after_load=_peak_rss_mb())
        if setup.get("digests_only"):  # the speed section's untimed first run: hash the weights once
            t0 = time.perf_counter()
            model.digest(), model.transcoders.digest()
            res["digest_s"] = time.perf_counter() - t0
        if setup.get("check_hf_logits") and setup["runs"]:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32).eval()
            tok = torch.tensor(setup["runs"][0]["tokens"], dtype=torch.long)
            with torch.no_grad():
                ref = hf(tok[None]).logits[0]
            res["hf_logits"] = {
                "max_abs_diff": float((model.capture(tok).logits.cpu().float() - ref).abs().max()),
                "max_abs_logit": float(ref.abs().max()),
            }
            del hf
        save()
        if setup.get("interventions"):
            res["interventions"] = run_our_interventions(model, setup["interventions"], sdir)
            save()
        for spec in setup["runs"]:
            info: dict = {}
            res["runs"][spec["name"]] = info
            try:
                tokens = torch.tensor(spec["tokens"], dtype=torch.long)
                info["n_pos"] = int(tokens.numel())
                if spec.get("prompt"):
                    info["string_tokens"] = model.tokenize(spec["prompt"]).tolist()
                store = sdir / f"{spec['name']}.zarr"
                if store.exists():
                    shutil.rmtree(store)
                if on_gpu:  # the peak of this call alone (the weights it keeps resident included)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                graph = attribute(
                    tokens,
                    model,
                    store=store,
                    verbose=False,
                    max_n_logits=spec.get("max_n_logits", 10),
                    desired_logit_prob=spec.get("desired_logit_prob", 0.95),
                    batch_size=spec.get("batch_size", 256),
                    max_feature_nodes=spec.get("max_feature_nodes"),
                    update_interval=spec.get("update_interval", 4),
                    zero_bos_errors=zero_bos,
                )
                if on_gpu:
                    torch.cuda.synchronize()
                info["attribute_s"] = time.perf_counter() - t0
                if on_gpu:
                    info["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
                info.update(
                    n_nodes=int(graph.n_nodes),
                    n_active=int(graph.n_active),
                    n_selected=int(graph.n_selected),
                    n_logits=int(graph.n_logits),
                    peak_rss_mb_after_attribute=_peak_rss_mb(),
                )
                arrays = {
                    "input_tokens": np.asarray(graph.input_tokens, dtype=np.int64),
                    "active_features": np.asarray(graph.active_features, dtype=np.int64),
                    "activation_values": np.asarray(graph.activation_values, dtype=np.float32),
                    "selected_features": np.asarray(graph.selected_features, dtype=np.int64),
                    "logit_tokens": np.asarray(graph.logit_tokens, dtype=np.int64),
                    "logit_probabilities": np.asarray(graph.logit_probabilities, dtype=np.float32),
                }
                if spec.get("prune", True):
                    nt, et = spec.get("node_threshold", 0.8), spec.get("edge_threshold", 0.98)
                    t0 = time.perf_counter()
                    pr = prune_graph(graph, nt, et)
                    info["prune_s"] = time.perf_counter() - t0
                    info.update(
                        replacement_score=pr.replacement_score,
                        completeness_score=pr.completeness_score,
                        n_kept_nodes=int(pr.node_mask.sum()),
                        n_kept_edges=int(pr.edge_mask.nnz),
                    )
                    coo = pr.edge_mask.tocoo()
                    arrays.update(
                        node_mask=np.asarray(pr.node_mask),
                        edge_rows=coo.row.astype(np.int64),
                        edge_cols=coo.col.astype(np.int64),
                        cumulative_scores=np.asarray(pr.cumulative_scores, dtype=np.float64),
                    )
                    if spec.get("export", True):
                        t0 = time.perf_counter()
                        create_graph_files(
                            graph,
                            spec["name"],
                            sdir / "graphs",
                            pruned=pr,
                            tokenizer=model.tokenizer,
                            scan=job.get("scan", SCAN),
                        )
                        info["export_s"] = time.perf_counter() - t0
                if spec.get("save", "full") == "full":
                    A = graph.to_scipy_sparse().tocoo()
                    arrays.update(
                        adj_rows=A.row.astype(np.int64),
                        adj_cols=A.col.astype(np.int64),
                        adj_vals=A.data.astype(np.float32),
                        adj_shape=np.array(A.shape, dtype=np.int64),
                    )
                np.savez(sdir / f"{spec['name']}.npz", **arrays)
                info["store_bytes"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
                if not spec.get("keep_store", False):
                    shutil.rmtree(store, ignore_errors=True)
                info["peak_rss_mb"] = _peak_rss_mb()
            except Exception as exc:  # report it and go on
                info["error"] = f"{type(exc).__name__}: {exc}"
            save()
        del model
    result["total_s"] = time.perf_counter() - t_start
    save()


def _decode_interventions(items: list) -> list[tuple]:
    """JSON ``[layer, pos, feature, value]`` rows as intervention tuples (as ct_runner.py reads
    them); ``pos`` is an int or ``{"slice": [start, stop]}``, stop null for open-ended."""
    out = []
    for layer, pos, feature, value in items:
        if isinstance(pos, dict):
            pos = slice(*pos["slice"])
        out.append((int(layer), pos, int(feature), float(value)))
    return out


def run_our_interventions(model, spec: dict, out_dir: Path) -> dict:
    """Our ``feature_intervention`` / ``feature_intervention_generate`` with our defaults, and
    again with ``errors="frozen"`` (the local replacement model); arrays as ct_runner.py's
    ``run_interventions`` names them (the frozen-errors ones with ``.frozen`` before the suffix)."""
    import numpy as np
    import torch

    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    arrays: dict = {"clean.logits": model.capture(tokens).logits.float().cpu().numpy()}
    info: dict = {}
    for case in spec["cases"]:
        kwargs = {}
        if case.get("constrained_layers") is not None:
            kwargs["constrained_layers"] = range(*case["constrained_layers"])
        if "freeze_attention" in case:
            kwargs["freeze_attention"] = case["freeze_attention"]
        ivs = _decode_interventions(case["interventions"])
        for variant, extra in (("", {}), (".frozen", {"errors": "frozen"})):
            name = case["name"] + variant
            t0 = time.perf_counter()
            try:
                if case.get("generate"):
                    g = model.feature_intervention_generate(
                        tokens,
                        ivs,
                        max_new_tokens=case["generate"]["max_new_tokens"],
                        stop_at_eos=False,
                        **kwargs,
                        **extra,
                    )
                    logits, acts = g.logits, g.activations
                    arrays[f"{name}.tokens"] = g.tokens.cpu().numpy().astype(np.int64)
                else:
                    logits, acts = model.feature_intervention(tokens, ivs, **kwargs, **extra)
                arrays[f"{name}.logits"] = logits.float().cpu().numpy()
                arrays[f"{name}.activations"] = acts.float().cpu().numpy()
                info[name] = {"s": time.perf_counter() - t0}
            except Exception as exc:  # report it and go on with the other cases
                info[name] = {"error": f"{type(exc).__name__}: {exc}"}
    np.savez(out_dir / "interventions.npz", **arrays)
    return info


# ============================================================================================
# Running the two engines
# ============================================================================================
def _limits(mem_cap_bytes: int | None):
    def apply() -> None:
        if mem_cap_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (mem_cap_bytes, mem_cap_bytes))

    return apply


def run_engine(
    engine: str,
    setups: list[dict],
    out_dir: Path,
    *,
    threads: int,
    timeout_s: float,
    mem_cap_gb: float | None,
    zero_bos_errors: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Run one engine's subprocess on ``setups``; returns its result.json plus a ``status``.

    device, dtype: where and in what both engines load the model and transcoders (gpu.py)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    job = {
        "out_dir": str(out_dir),
        "threads": threads,
        "scan": SCAN,
        "setups": setups,
        "zero_bos_errors": zero_bos_errors,
        "device": device,
        "dtype": dtype,
    }
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job))
    if engine == "ours":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
    else:
        cmd = [str(CT_VENV / "bin" / "python"), str(CT_RUNNER), str(job_path)]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=str(REPO),
        TQDM_DISABLE="1",
    )
    env.pop("VIRTUAL_ENV", None)
    cap = int(mem_cap_gb * 2**30) if mem_cap_gb else None
    t0 = time.perf_counter()
    with open(out_dir / "log.txt", "w") as logf:
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_limits(cap),
            cwd=str(out_dir),
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"time cap {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    res_path = out_dir / "result.json"
    result = json.loads(res_path.read_text()) if res_path.exists() else {"setups": {}}
    result["status"], result["process_s"] = status, wall
    if status != "ok":
        tail = (out_dir / "log.txt").read_text(errors="replace")[-2000:]
        result["log_tail"] = tail
        if "can't allocate memory" in tail or "MemoryError" in tail or "out of memory" in tail.lower():
            result["status"] = f"memory cap {mem_cap_gb} GB" if mem_cap_gb else "out of memory"
    return result


# ============================================================================================
# Comparison
# ============================================================================================
def _load_npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _dense(arrs: dict, n: int):
    import numpy as np

    if "adjacency" in arrs:
        return arrs["adjacency"].astype(np.float32)
    A = np.zeros((n, n), dtype=np.float32)
    A[arrs["adj_rows"], arrs["adj_cols"]] = arrs["adj_vals"]
    return A


def _node_keys(arrs: dict, n_layers: int) -> tuple:
    """Compute-order key of every graph-order node (features: active index)."""
    import numpy as np

    sel = arrs["selected_features"]
    n_active = len(arrs["active_features"])
    n_pos = len(arrs["input_tokens"])
    n_rest = n_layers * n_pos + n_pos + len(arrs["logit_tokens"])
    return np.concatenate([sel, n_active + np.arange(n_rest)]), n_active, n_pos


def _label(key: int, arrs: dict, n_layers: int) -> str:
    n_active = len(arrs["active_features"])
    n_pos = len(arrs["input_tokens"])
    if key < n_active:
        l, p, f = (int(v) for v in arrs["active_features"][key])
        return f"feature L{l} p{p} #{f}"
    k = key - n_active
    if k < n_layers * n_pos:
        return f"error L{k // n_pos} p{k % n_pos}"
    k -= n_layers * n_pos
    if k < n_pos:
        return f"token p{k}"
    return f"logit {int(arrs['logit_tokens'][k - n_pos])}"


def compare_graphs(ours: dict, theirs: dict, n_layers: int, *, rel_tol: float = 1e-5) -> dict:
    """Exactness and pruning rows of one (ours, theirs) pair of saved graphs."""
    import numpy as np

    out: dict = {}
    out["same_input_tokens"] = bool(np.array_equal(ours["input_tokens"], theirs["input_tokens"]))
    out["same_active_features"] = bool(np.array_equal(ours["active_features"], theirs["active_features"]))
    out["n_active"] = [len(ours["active_features"]), len(theirs["active_features"])]
    if out["same_active_features"]:
        out["activation_max_abs"] = float(
            np.abs(ours["activation_values"] - theirs["activation_values"]).max(initial=0)
        )
    out["same_selected_features"] = bool(
        np.array_equal(np.sort(ours["selected_features"]), np.sort(theirs["selected_features"]))
    )
    if not out["same_selected_features"]:
        a, b = set(ours["selected_features"].tolist()), set(theirs["selected_features"].tolist())
        out["selected_only_ours"], out["selected_only_theirs"] = len(a - b), len(b - a)
    out["same_logit_tokens"] = bool(np.array_equal(ours["logit_tokens"], theirs["logit_tokens"]))
    if out["same_logit_tokens"]:
        out["logit_prob_max_abs"] = float(
            np.abs(ours["logit_probabilities"].astype(np.float64) - theirs["logit_probabilities"]).max(initial=0)
        )
    if not out["same_active_features"] or not out["same_input_tokens"]:
        return out

    # adjacency over the rows and columns both graphs have
    ko, n_active, n_pos = _node_keys(ours, n_layers)
    kt, _, _ = _node_keys(theirs, n_layers)
    n_o, n_t = len(ko), len(kt)
    Ao = _dense(ours, n_o)
    At = _dense(theirs, n_t) if "adjacency" in theirs else None
    if At is None:
        return out
    shared = np.intersect1d(ko, kt)
    io = np.searchsorted(ko, shared)  # keys are sorted in both (features by active index, then rest)
    it = np.searchsorted(kt, shared)
    rows_o = np.zeros(n_o, bool)
    rows_o[: len(ours["selected_features"])] = True
    rows_o[n_o - len(ours["logit_tokens"]) :] = True
    rows_t = np.zeros(n_t, bool)
    rows_t[: len(theirs["selected_features"])] = True
    rows_t[n_t - len(theirs["logit_tokens"]) :] = True
    row_mask = rows_o[io] & rows_t[it]
    ro, rt = io[row_mask], it[row_mask]
    X = Ao[np.ix_(ro, io)].astype(np.float64)
    Y = At[np.ix_(rt, it)].astype(np.float64)
    diff = np.abs(X - Y)
    ref = float(np.abs(Y).max(initial=0))
    out["adj_shared_rows"], out["adj_shared_cols"] = int(len(ro)), int(len(io))
    out["adj_max_abs"] = float(diff.max(initial=0))
    out["adj_max_ref"] = ref
    out["adj_rel"] = out["adj_max_abs"] / ref if ref else 0.0
    big = np.abs(Y) >= 1e-3 * ref
    out["adj_rel_entry"] = float((diff[big] / np.abs(Y[big])).max(initial=0)) if big.any() else 0.0
    out["adj_pattern_mismatch"] = int(((X != 0) != (Y != 0)).sum())
    worst = np.argsort(diff, axis=None)[::-1][:5]
    out["adj_worst"] = [
        {
            "target": _label(int(shared[row_mask][r]), ours, n_layers),
            "source": _label(int(shared[c]), ours, n_layers),
            "ours": float(X[r, c]),
            "theirs": float(Y[r, c]),
        }
        for r, c in zip(*np.unravel_index(worst, diff.shape))
        if diff[r, c] > 0
    ]
    # columns that differ as a whole (e.g. a node whose output vector differs)
    col_diff = diff.max(axis=0)
    bad_cols = np.nonzero(col_diff > rel_tol * max(ref, 1e-30))[0]
    out["adj_bad_columns"] = [_label(int(shared[c]), ours, n_layers) for c in bad_cols[:20]]
    out["adj_n_bad_columns"] = int(len(bad_cols))
    out["adj_ok"] = out["adj_rel"] <= rel_tol

    # the same without the BOS-position error columns (circuit-tracer zeroes those vectors)
    n_active_o = len(ours["active_features"])
    bos_err = np.array([n_active_o + l * n_pos for l in range(n_layers)])
    keep_c = ~np.isin(shared, bos_err)
    d2 = diff[:, keep_c]
    out["adj_max_abs_excl_bos_error"] = float(d2.max(initial=0))
    out["adj_rel_excl_bos_error"] = out["adj_max_abs_excl_bos_error"] / ref if ref else 0.0
    out["bos_error_column_max_abs"] = {
        "ours": float(np.abs(X[:, ~keep_c]).max(initial=0)),
        "theirs": float(np.abs(Y[:, ~keep_c]).max(initial=0)),
    }

    # our pruning code on circuit-tracer's adjacency, and on ours with the BOS errors zeroed
    if "node_mask" in theirs and out["same_selected_features"]:
        from pipeline.graph.pruning import prune_graph_dense

        def prune_on(A, arrs):
            n_sel, n_log = len(arrs["selected_features"]), len(arrs["logit_tokens"])
            w = np.zeros(A.shape[0])
            w[A.shape[0] - n_log :] = arrs["logit_probabilities"]
            return prune_graph_dense(A, n_log, n_pos, n_layers * n_pos, n_sel, w)

        def same_masks(pr, arrs):
            coo = pr.edge_mask.tocoo()
            e1 = set(zip(coo.row.tolist(), coo.col.tolist()))
            e2 = set(zip(arrs["edge_rows"].tolist(), arrs["edge_cols"].tolist()))
            return bool(np.array_equal(pr.node_mask, arrs["node_mask"])) and e1 == e2

        pr = prune_on(At, theirs)
        out["our_pruning_on_ct_adjacency"] = {
            "same_masks_as_ct": same_masks(pr, theirs),
            "replacement": pr.replacement_score,
            "completeness": pr.completeness_score,
        }
        Az = Ao.copy()
        n_sel_o = len(ours["selected_features"])
        Az[:, [n_sel_o + l * n_pos for l in range(n_layers)]] = 0
        prz = prune_on(Az, ours)
        out["our_pruning_bos_errors_zeroed"] = {
            "same_masks_as_ct": same_masks(prz, theirs),
            "replacement": prz.replacement_score,
            "completeness": prz.completeness_score,
        }

    # pruning (each engine's pruning of its own graph)
    if "node_mask" in ours and "node_mask" in theirs and out["same_selected_features"]:
        out["same_node_mask"] = bool(np.array_equal(ours["node_mask"], theirs["node_mask"]))
        eo = set(zip(ours["edge_rows"].tolist(), ours["edge_cols"].tolist()))
        et = set(zip(theirs["edge_rows"].tolist(), theirs["edge_cols"].tolist()))
        out["same_edge_mask"] = eo == et
        out["edges"] = [len(eo), len(et)]
        if eo != et:
            out["edges_only_ours"], out["edges_only_theirs"] = len(eo - et), len(et - eo)
        out["cumulative_scores_max_abs"] = float(
            np.abs(ours["cumulative_scores"] - theirs["cumulative_scores"]).max(initial=0)
        )
    return out


def _close(a, b, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return abs(float(a) - float(b)) <= abs_ + rel * abs(float(b))
    return a == b


def compare_json(ours_path: Path, theirs_path: Path) -> dict:
    """Nodes and links of two graph JSON files (ignoring order; floats within tolerance)."""
    o, t = json.loads(ours_path.read_text()), json.loads(theirs_path.read_text())
    no = {n["node_id"]: n for n in o["nodes"]}
    nt = {n["node_id"]: n for n in t["nodes"]}
    out = {
        "nodes": [len(no), len(nt)],
        "nodes_only_ours": sorted(set(no) - set(nt))[:10],
        "nodes_only_theirs": sorted(set(nt) - set(no))[:10],
    }
    field_diffs: dict[str, int] = {}
    examples = []
    for nid in set(no) & set(nt):
        for k in set(no[nid]) | set(nt[nid]):
            if not _close(no[nid].get(k), nt[nid].get(k)):
                field_diffs[k] = field_diffs.get(k, 0) + 1
                if len(examples) < 5:
                    examples.append({"node": nid, "field": k, "ours": no[nid].get(k), "theirs": nt[nid].get(k)})
    out["node_field_diffs"], out["node_field_examples"] = field_diffs, examples
    lo = {(x["source"], x["target"]): x["weight"] for x in o["links"]}
    lt = {(x["source"], x["target"]): x["weight"] for x in t["links"]}
    out["links"] = [len(lo), len(lt)]
    out["links_only_ours"], out["links_only_theirs"] = len(set(lo) - set(lt)), len(set(lt) - set(lo))
    worst = 0.0
    for k in set(lo) & set(lt):
        worst = max(worst, abs(lo[k] - lt[k]) / max(abs(lt[k]), 1e-12))
    out["link_weight_max_rel"] = worst
    md = {
        k: (o["metadata"].get(k), t["metadata"].get(k))
        for k in set(o["metadata"]) | set(t["metadata"])
        if o["metadata"].get(k) != t["metadata"].get(k)
    }
    out["metadata_diffs"] = md
    out["same"] = (
        not out["nodes_only_ours"]
        and not out["nodes_only_theirs"]
        and not field_diffs
        and not out["links_only_ours"]
        and not out["links_only_theirs"]
        and worst <= 1e-4
    )
    return out


def verify_by_intervention(setup: Setup, tokens: list[int], theirs_npz: Path, work: Path) -> dict:
    """Which side is right where the adjacency differs: intervene on the frozen model.

    Uses the test suite's ``FrozenReference`` (tests/engine/test_attribution.py: reruns the model with
    attention patterns, norm scales and MLP outputs patched to their clean values, plus one
    source's output vector; no gradients), in float64. For a few source columns the change of
    every target is compared with our column and with circuit-tracer's (float32).
    """
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests" / "engine"))
    import test_attribution as TA  # noqa: E402  (the test suite's reference)

    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel

    model = ReplacementModel.from_pretrained(setup.model_dir, setup.transcoder_dir, dtype=torch.float64)
    tok = torch.tensor(tokens, dtype=torch.long)
    store = work / "verify" / f"{setup.name}.zarr"
    if store.exists():
        shutil.rmtree(store)
    graph = attribute(tok, model, batch_size=16, store=store, verbose=False)
    ref = TA.FrozenReference(model, tok)
    A = graph.adjacency_dense()
    ct = _load_npz(theirs_npz)
    C = ct["adjacency"].astype(np.float64)
    if not np.array_equal(ct["selected_features"], graph.selected_features) or C.shape != A.shape:
        return {"error": "graphs do not have the same nodes"}
    checks = {}
    feats = np.arange(graph.feature_slice.start, graph.feature_slice.stop)
    strongest = int(feats[np.argmax(np.abs(A[:, feats]).sum(0))]) if len(feats) else None
    nodes = {f"error L{l} p0 (BOS)": graph.error_node(l, 0) for l in range(graph.n_layers - 1)}
    nodes["error L0 p1"] = graph.error_node(0, 1)
    nodes["token p0 (BOS)"] = graph.token_node(0)
    if strongest is not None:
        nodes["strongest feature"] = strongest
    for label, node in nodes.items():
        delta = ref.target_changes(graph, ref.source_additions(graph, int(node)))
        scale = max(float(np.abs(delta).max()), 1e-30)
        checks[label] = {
            "intervention_max_abs_change": float(np.abs(delta).max()),
            "ours_rel_err": float(np.abs(A[:, node] - delta).max() / scale),
            "ct_rel_err": float(np.abs(C[:, node] - delta).max() / scale),
        }
    shutil.rmtree(store, ignore_errors=True)
    return checks


# ============================================================================================
# Plans
# ============================================================================================
def _run_spec(name, tokens, prompt, **kw) -> dict:
    spec = {
        "name": name,
        "tokens": tokens,
        "prompt": prompt,
        "max_n_logits": 10,
        "desired_logit_prob": 0.95,
        "batch_size": 256,
        "max_feature_nodes": None,
        "update_interval": 4,
        "node_threshold": 0.8,
        "edge_threshold": 0.98,
    }
    spec.update(kw)
    return spec


def exactness_setups(setups: list[Setup], n_tokens: int, mfn: int, batch_size: int) -> list[dict]:
    out = []
    for s in setups:
        toks, text = token_ids(s.model_dir, n_tokens)
        out.append(
            {
                "name": s.name,
                "model_dir": s.model_dir,
                "transcoder_dir": s.transcoder_dir,
                "check_hf_logits": True,
                "runs": [
                    _run_spec("all", toks, text, batch_size=batch_size),
                    _run_spec(f"mfn{mfn}", toks, text, batch_size=batch_size, max_feature_nodes=mfn),
                ],
            }
        )
    return out


def intervention_cases(setup: Setup, tokens: list[int]) -> list[dict]:
    """The interventions section's cases on one setup, with absolute values (circuit-tracer's
    form: a number sets the activation), so both engines are given the same numbers.

    Picks the 3 strongest active features of layer 0 and the 2 strongest of the last layer
    (positions after BOS; their clean activations ``a`` from our engine): ablation (0) and
    ×−2 with frozen and free attention; 10 a in a constrained range (layer 0 only, the last
    layer only, every layer); greedy generation with open-ended ×−2 (from the first picked
    position on) with frozen and free attention.
    """
    import torch

    from pipeline.engine.replacement import ReplacementModel

    model = ReplacementModel.from_pretrained(setup.model_dir, setup.transcoder_dir)
    acts = model.capture(torch.tensor(tokens, dtype=torch.long)).activations
    n_layers = acts.shape[0]

    def strongest(layer: int, k: int) -> list[tuple[int, int, int, float]]:
        a = acts[layer, 1:].clone()
        flat = torch.argsort(a.reshape(-1), descending=True, stable=True)[:k]
        out = []
        for i in flat.tolist():
            pos, feat = divmod(i, a.shape[1])
            if float(a[pos, feat]) > 0:
                out.append((layer, pos + 1, feat, float(a[pos, feat])))
        return out

    first, last = strongest(0, 3), strongest(n_layers - 1, 2)
    picks = first + last

    def scaled(feats, factor, open_ended=False):
        start = min(p for _, p, _, _ in feats)
        return [[l, {"slice": [start, None]} if open_ended else p, f, factor * a] for l, p, f, a in feats]

    gen = {"max_new_tokens": 4}
    return [
        {"name": "ablate", "interventions": scaled(picks, 0.0)},
        {"name": "ablate, attention free", "interventions": scaled(picks, 0.0), "freeze_attention": False},
        {"name": "x-2", "interventions": scaled(picks, -2.0)},
        {"name": "x-2, attention free", "interventions": scaled(picks, -2.0), "freeze_attention": False},
        {"name": "10x, constrained [0, 1)", "interventions": scaled(first, 10.0), "constrained_layers": [0, 1]},
        {
            "name": f"10x, constrained [{n_layers - 1}, {n_layers})",
            "interventions": scaled(picks, 10.0),
            "constrained_layers": [n_layers - 1, n_layers],
        },
        {
            "name": f"10x, constrained [0, {n_layers})",
            "interventions": scaled(picks, 10.0),
            "constrained_layers": [0, n_layers],
        },
        {"name": "generate, open-ended x-2", "interventions": scaled(first, -2.0, True), "generate": gen},
        {
            "name": "generate, open-ended x-2, attention free",
            "interventions": scaled(first, -2.0, True),
            "generate": gen,
            "freeze_attention": False,
        },
    ]


def intervention_rows(ours: dict, theirs: dict, setups: list[dict], work: Path) -> list[dict]:
    """Per setup and case: ``rel`` = max |ours - theirs| / max |theirs| over every logit (our
    defaults), ``rel_frozen`` the same for ours with ``errors="frozen"``, ``rel_acts`` for the
    returned activations, ``effect`` = max |theirs - clean| / max |theirs| (what the case moved),
    ``attention_effect`` for a free-attention case: max |theirs - theirs with frozen attention| /
    max |theirs| (the difference the case can detect)."""
    import numpy as np

    rows = []
    for s in setups:
        name = s["name"]
        try:
            o = _load_npz(work / "ours" / name / "interventions.npz")
            t = _load_npz(work / "theirs" / name / "interventions.npz")
        except OSError as exc:
            rows.append({"setup": name, "error": str(exc)})
            continue
        io = ours.get("setups", {}).get(name, {}).get("interventions", {})
        it = theirs.get("setups", {}).get(name, {}).get("interventions", {})
        for case in s["interventions"]["cases"]:
            c = case["name"]
            row: dict = {"setup": name, "case": c}
            errs = {k: v[c]["error"] for k, v in (("ours", io), ("theirs", it)) if "error" in v.get(c, {})}
            if errs or f"{c}.logits" not in t or f"{c}.logits" not in o:
                row["error"] = errs or "missing"
                rows.append(row)
                continue
            tl = t[f"{c}.logits"].astype(np.float64)
            scale = float(np.abs(tl).max())
            if f"{c}.tokens" in t:
                row["tokens_equal"] = bool(np.array_equal(o[f"{c}.tokens"], t[f"{c}.tokens"]))
                row["tokens_equal_frozen"] = bool(np.array_equal(o[f"{c}.frozen.tokens"], t[f"{c}.tokens"]))
                clean = t["clean.logits"][-1:]
                row["effect"] = float(np.abs(tl[0] - clean[0]).max()) / scale
            else:
                row["effect"] = float(np.abs(tl - t["clean.logits"]).max()) / scale
            row["max_abs_logit"] = scale
            row["rel"] = float(np.abs(o[f"{c}.logits"] - tl).max()) / scale
            row["rel_frozen"] = float(np.abs(o[f"{c}.frozen.logits"] - tl).max()) / scale
            twin = c.removesuffix(", attention free")
            if twin != c and f"{twin}.logits" in t:  # how much freeing attention moved circuit-tracer's logits
                row["attention_effect"] = float(np.abs(t[f"{twin}.logits"] - tl).max()) / scale
            ta = t[f"{c}.activations"]
            row["rel_acts"] = float(np.abs(o[f"{c}.activations"] - ta).max()) / max(float(np.abs(ta).max()), 1e-30)
            rows.append(row)
    return rows


def interventions_table(rows: list[dict]) -> list[str]:
    lines = [
        "| fixture | case | effect | ours vs circuit-tracer | ours, errors=frozen, vs circuit-tracer | activations | tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setup']} | {r.get('case', '-')} | error: {r['error']} |||||")
            continue
        tok = "-" if "tokens_equal" not in r else ("same" if r["tokens_equal"] else "DIFFER")
        lines.append(
            f"| {r['setup']} | {r['case']} | {_fmt(r['effect'])} | {_fmt(r['rel'])} | {_fmt(r['rel_frozen'])} | "
            f"{_fmt(r['rel_acts'])} | {tok} |"
        )
    return lines


def n_layers_of(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg.get("n_layer") or cfg.get("num_hidden_layers"))


def exactness_rows(ours: dict, theirs: dict, setups: list[dict], work: Path) -> list[dict]:
    rows = []
    for s in setups:
        n_layers = n_layers_of(s["model_dir"])
        so = ours.get("setups", {}).get(s["name"], {})
        st = theirs.get("setups", {}).get(s["name"], {})
        for r in s["runs"]:
            row = {
                "setup": s["name"],
                "run": r["name"],
                "n_pos": len(r["tokens"]),
                "max_feature_nodes": r["max_feature_nodes"],
                "hf_logits_max_abs_ct": st.get("hf_logits", {}).get("max_abs_diff"),
                "hf_logits_max_abs_ours": so.get("hf_logits", {}).get("max_abs_diff"),
            }
            io, it = so.get("runs", {}).get(r["name"], {}), st.get("runs", {}).get(r["name"], {})
            row["ours_info"], row["theirs_info"] = io, it
            if "error" in io or "error" in it or not io or not it:
                row["error"] = {
                    "ours": io.get("error", "missing" if not io else None),
                    "theirs": it.get("error", "missing" if not it else None),
                }
                rows.append(row)
                continue
            row["ct_string_tokens_equal_ids"] = it.get("ct_string_tokens") == r["tokens"]
            row["our_string_tokens_equal_ids"] = io.get("string_tokens") == r["tokens"]
            po = work / "ours" / s["name"] / f"{r['name']}.npz"
            pt = work / "theirs" / s["name"] / f"{r['name']}.npz"
            row.update(compare_graphs(_load_npz(po), _load_npz(pt), n_layers))
            for k in ("replacement_score", "completeness_score"):
                row[k] = [io.get(k), it.get(k)]
            jo = work / "ours" / s["name"] / "graphs" / f"{r['name']}.json"
            jt = work / "theirs" / s["name"] / "graphs" / f"{r['name']}.json"
            if jo.exists() and jt.exists():
                row["json"] = compare_json(jo, jt)
            rows.append(row)
    return rows


# ============================================================================================
# Table
# ============================================================================================
def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-2 or abs(x) >= 1e4:
            return f"{x:.1e}"
        return f"{x:.{nd}f}"
    return str(x)


def exactness_table(rows: list[dict]) -> list[str]:
    head = (
        "| fixture | max_feature_nodes | logits vs HF (ours, ct) | tokens | active | selected | logits (tok, max Δp) | "
        "adjacency max abs / rel / rel_entry | rel without BOS-error columns | pruning: nodes, edges | "
        "our pruning on ct's adjacency = ct's | replacement, completeness (ours / ct) | graph JSON |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['setup']} | {r['max_feature_nodes'] or 'all'} | {r['n_pos']} | error: {r['error']} |||||||||"
            )
            continue
        logits = f"{_fmt(r.get('same_logit_tokens'))}, {_fmt(r.get('logit_prob_max_abs'))}"
        adj = f"{_fmt(r.get('adj_max_abs'))} / {_fmt(r.get('adj_rel'))} / {_fmt(r.get('adj_rel_entry'))}" + (
            ""
            if r.get("adj_ok")
            else f" (cols: {', '.join(r.get('adj_bad_columns', [])[:3])}"
            + (f" +{r['adj_n_bad_columns'] - 3}" if r.get("adj_n_bad_columns", 0) > 3 else "")
            + ")"
        )
        prune = f"{_fmt(r.get('same_node_mask'))}, {_fmt(r.get('same_edge_mask'))}"
        if r.get("edges"):
            prune += f" ({r['edges'][0]}/{r['edges'][1]} edges)"
        rs = r.get("replacement_score", [None, None])
        cs = r.get("completeness_score", [None, None])
        sc = f"{_fmt(rs[0], 4)}/{_fmt(rs[1], 4)}, {_fmt(cs[0], 4)}/{_fmt(cs[1], 4)}"
        j = r.get("json", {})
        js = "-"
        if j:
            why = [f"{k} x{v}" for k, v in j.get("node_field_diffs", {}).items()]
            if j.get("nodes_only_ours") or j.get("nodes_only_theirs"):
                why.append(f"node sets differ ({len(j['nodes_only_ours'])}+/{len(j['nodes_only_theirs'])}-)")
            if j.get("links_only_ours") or j.get("links_only_theirs"):
                why.append(f"links differ ({j['links_only_ours']}+/{j['links_only_theirs']}-)")
            why += [f"metadata.{k}" for k in j.get("metadata_diffs", {})]
            js = (
                _fmt(j.get("same"))
                + f" (nodes {j['nodes'][0]}/{j['nodes'][1]}, links {j['links'][0]}/{j['links'][1]}, "
                f"weights rel {_fmt(j.get('link_weight_max_rel'))}" + (f"; {', '.join(why)}" if why else "") + ")"
            )
        sel = _fmt(r.get("same_selected_features"))
        if not r.get("same_selected_features"):
            sel += f" ({r.get('selected_only_ours')}/{r.get('selected_only_theirs')} differ)"
        cross = r.get("our_pruning_on_ct_adjacency", {}).get("same_masks_as_ct")
        hf = f"{_fmt(r.get('hf_logits_max_abs_ours'))}, {_fmt(r.get('hf_logits_max_abs_ct'))}"
        lines.append(
            f"| {r['setup']} | {r['max_feature_nodes'] or 'all'} | {hf} | {_fmt(r.get('same_input_tokens'))} | "
            f"{_fmt(r.get('same_active_features'))} | {sel} | {logits} | {adj} | "
            f"{_fmt(r.get('adj_rel_excl_bos_error'))} | {prune} | {_fmt(cross)} | {sc} | {js} |"
        )
    return lines


def speed_table(rows: list[dict]) -> list[str]:
    lines = [
        "| fixture | tokens | nodes (ours/ct) | attribute s ours | ct | ours/ct | +prune+export s ours | ct | "
        "peak RSS MB ours | ct | ours/ct | first run's weight hashing s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        ratio_t = o.get("attribute_s") / t["attribute_s"] if o.get("attribute_s") and t.get("attribute_s") else None
        ratio_m = o.get("peak_rss_mb") / t["peak_rss_mb"] if o.get("peak_rss_mb") and t.get("peak_rss_mb") else None
        e2e_o = sum(o.get(k, 0) for k in ("attribute_s", "prune_s", "export_s")) if o.get("attribute_s") else None
        e2e_t = sum(t.get(k, 0) for k in ("attribute_s", "prune_s", "export_s")) if t.get("attribute_s") else None
        lines.append(
            f"| {r['setup']} (mfn {r['max_feature_nodes'] or 'all'}) | {r['n_pos']} | {o.get('n_nodes', '-')}/{t.get('n_nodes', '-')} | "
            f"{_fmt(o.get('attribute_s', o.get('status')), 1)} | {_fmt(t.get('attribute_s', t.get('status')), 1)} | {_fmt(ratio_t)} | "
            f"{_fmt(e2e_o, 1)} | {_fmt(e2e_t, 1)} | {_fmt(o.get('peak_rss_mb'), 0)} | {_fmt(t.get('peak_rss_mb'), 0)} | "
            f"{_fmt(ratio_m)} | {_fmt(r.get('digest_first_s'), 1)} | {r.get('load_avg', '-')} |"
        )
    return lines


def scale_table(rows: list[dict]) -> list[str]:
    """One line per prompt length: both engines side by side (all features, full graphs)."""
    lines = [
        "| tokens | nodes | ours: status, attribute s, peak RSS MB | circuit-tracer: status, attribute s, peak RSS MB | "
        "time ours/ct | RSS ours/ct |",
        "|---|---|---|---|---|---|",
    ]
    by_n: dict[int, dict] = {}
    for r in rows:
        by_n.setdefault(r["n_pos"], {})[r["engine"]] = r
    for n in sorted(by_n):
        o, t = by_n[n].get("ours", {}), by_n[n].get("theirs", {})

        def cell(r):
            if not r:
                return "not run (a shorter prompt already failed)"
            return (
                f"{_short_status(str(r['status']))}, {_fmt(r.get('attribute_s'), 1)}, {_fmt(r.get('peak_rss_mb'), 0)}"
            )

        tr = o["attribute_s"] / t["attribute_s"] if o.get("attribute_s") and t.get("attribute_s") else None
        mr = o["peak_rss_mb"] / t["peak_rss_mb"] if o.get("peak_rss_mb") and t.get("peak_rss_mb") else None
        lines.append(
            f"| {n} | {o.get('n_nodes') or t.get('n_nodes') or '-'} | {cell(o)} | {cell(t)} | {_fmt(tr)} | {_fmt(mr)} |"
        )
    return lines


def build_tables(report: dict) -> list[str]:
    """The printed table, from the report's data (so reused sections print the same way)."""
    lines: list[str] = []
    if report.get("exactness"):
        zb = (report.get("settings") or {}).get("zero_bos_errors")
        lines += [
            "",
            "Exactness, pruning, graph JSON (tiny fixtures, 12 tokens; max_feature_nodes all / 20)"
            + (
                "; OURS WITH zero_bos_errors=True (--zero-bos-errors: BOS-position error vectors zeroed, as circuit-tracer does)"
                if zb
                else ""
            )
            + ":",
            "",
        ]
        lines += exactness_table(report["exactness"])
        bos = [r for r in report["exactness"] if r.get("ct_string_tokens_equal_ids") is False]
        if bos:
            r = bos[0]
            lines += [
                "",
                f"Input ids: both engines were given the same ids (BOS first). From the prompt text, our "
                f"tokenization gives those ids in {sum(bool(x.get('our_string_tokens_equal_ids')) for x in report['exactness'])}"
                f"/{len(report['exactness'])} runs; circuit-tracer's gives different ids in {len(bos)} runs: its first "
                f"id is {r['theirs_info'].get('ct_string_tokens', [None])[0]} instead of BOS "
                f"{r['ours_info'].get('string_tokens', [None])[0]} (it prepends the first non-zero special-token "
                "id, so a BOS id of 0 is skipped).",
            ]
    if report.get("interventions"):
        rows = report["interventions"]
        ok = [r["rel"] for r in rows if "rel" in r]
        lines += [
            "",
            "Interventions against circuit-tracer 0.5.0, defaults on both sides (tiny fixtures, 12 tokens; "
            "max |Δlogit| / max |logit| over every position, goal <= 1e-5; effect: max |logit - clean| / "
            "max |logit|, first generated step for generation):",
            "",
        ] + interventions_table(rows)
        att = [r["attention_effect"] for r in rows if "attention_effect" in r]
        if ok:
            lines += ["", f"Largest difference with our defaults: {max(ok):.2g} ({len(ok)} cases)."]
        if att:
            lines += [
                f"Freeing attention moves circuit-tracer's logits by {min(att):.2g} to {max(att):.2g} of the "
                "largest logit in these fixtures (their attention is nearly uniform): what the free-attention "
                "rows can tell apart."
            ]
    verify = report.get("verify_by_intervention") or {}
    if verify:
        lines += [
            "",
            "Differences checked by intervention on the frozen model (our engine in float64, circuit-tracer's "
            "float32 graph; relative error of each column against the measured change of every target):",
            "",
            "| fixture | source | max change | ours rel err | circuit-tracer rel err |",
            "|---|---|---|---|---|",
        ]
        for name, checks in verify.items():
            if "error" in checks:
                lines.append(f"| {name} | error: {checks['error']} ||||")
                continue
            for label, c in checks.items():
                lines.append(
                    f"| {name} | {label} | {_fmt(c['intervention_max_abs_change'])} | "
                    f"{_fmt(c['ours_rel_err'])} | {_fmt(c['ct_rel_err'])} |"
                )
    if report.get("exactness_big"):
        st = report.get("exactness_big_settings", {"n_tokens": 8, "max_feature_nodes": 128})
        zb = (report.get("settings") or {}).get("zero_bos_errors")
        lines += [
            "",
            f"Exactness on the GPT-2-small-shaped fixture ({st['n_tokens']} tokens, max_feature_nodes "
            f"{st['max_feature_nodes']})"
            + ("; ours with zero_bos_errors=True (--zero-bos-errors)" if zb else "")
            + ":",
            "",
        ] + exactness_table(report["exactness_big"])
    if report.get("speed"):
        st = report.get("speed_settings") or {}
        lines += [
            "",
            f"Speed and memory (GPT-2-small shape, max_feature_nodes={st.get('max_feature_nodes')}, batch "
            f"{st.get('batch_size')}, {st.get('threads')} threads; each engine in its own process, one after the "
            "other; RSS = peak of the process, model loading included):",
            "",
        ] + speed_table(report["speed"])
    if report.get("scale"):
        st = report.get("scale_settings") or {}
        cap = f"time cap {st.get('cap_s')} s"
        early = report.get("scale_settings_earlier")
        if early and early.get("cap_s") != st.get("cap_s"):
            cap = (
                f"time cap {early.get('cap_s')} s, rerun with {st.get('cap_s')} s at "
                f"{', '.join(str(n) for n in st.get('lengths', []))} tokens"
            )
        lines += [
            "",
            f"Scale (2 layers, d_model 64, 16384-feature PLTs at density 0.004, all features; {cap}, "
            f"address-space cap {st.get('mem_cap_gb')} GB):",
            "",
        ] + scale_table(report["scale"])
    return lines


# ============================================================================================
# Main
# ============================================================================================
def _loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _machine() -> dict:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem,
        "python": platform.python_version(),
    }


def ensure_ct_venv() -> None:
    if not (CT_VENV / "bin" / "python").exists():
        print("[compare] creating circuit-tracer's venv (bench/circuit_tracer_env.sh) ...", flush=True)
        subprocess.run(["bash", str(BENCH / "circuit_tracer_env.sh"), str(CT_VENV)], check=True)


def _short_status(text: str) -> str:
    """A failure reason short enough for a table cell (the full text stays in the JSON)."""
    import re

    m = re.search(r"CUDA out of memory\. Tried to allocate ([\d.]+ [KMGT]iB)", text)
    if m:
        return f"GPU out of memory (an allocation of {m.group(1)} failed)"
    if "OutOfMemoryError" in text:
        return "GPU out of memory"
    m = re.search(r"tried to allocate (\d+) bytes", text)
    if m:
        return f"out of memory (an allocation of {int(m.group(1)) / 2**30:.1f} GiB failed)"
    if "can't allocate memory" in text or "MemoryError" in text:
        return "out of memory"
    return text if len(text) <= 80 else text[:77] + "..."


def _single(engine_result: dict, setup: str, run: str) -> dict:
    info = dict(engine_result.get("setups", {}).get(setup, {}).get("runs", {}).get(run, {}))
    if not info or "attribute_s" not in info:
        reason = engine_result.get("status") if engine_result.get("status") != "ok" else info.get("error", "failed")
        info["status"] = _short_status(str(reason))
        if "error" in info:
            info["error_full"] = info["error"]
    info["peak_rss_mb"] = engine_result.get("peak_rss_mb") if "attribute_s" in info else None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny fixtures only (< 3 minutes)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/compare[-quick].json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64], help="speed prompt lengths")
    ap.add_argument(
        "--speed-mfn",
        type=int,
        default=256,
        help="max_feature_nodes for the gpt2small speed runs (the full graph takes hours here)",
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="speed runs per engine and length")
    ap.add_argument("--speed-cap-s", type=float, default=900)
    ap.add_argument("--no-clt-speed", action="store_true")
    ap.add_argument("--scale-lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--scale-cap-s", type=float, default=1200)
    ap.add_argument("--mem-cap-gb", type=float, default=14.0)
    ap.add_argument(
        "--zero-bos-errors",
        action="store_true",
        help="exactness runs: our engine with attribute(zero_bos_errors=True) (zero BOS-position error "
        "vectors, as circuit-tracer does), to check that this alone explains the differences",
    )
    ap.add_argument(
        "--scale-append",
        action="store_true",
        help="with --reuse: keep the earlier scale rows of other lengths (rerun some lengths with a longer cap)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=list(SECTION_KEYS))
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(SECTION_KEYS),
        help="run only these sections (--skip every other one); with --reuse the others come from there",
    )
    ap.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="take the skipped sections from this earlier results JSON (to rerun one section)",
    )
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.only:
        args.skip = [s for s in SECTION_KEYS if s not in args.only]

    t_all = time.perf_counter()
    ensure_ct_venv()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "load_avg_start": _loadavg(),
        "quick": args.quick,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }

    # ---------------------------------------------------------------- exactness (tiny)
    print("[compare] fixtures ...", flush=True)
    tiny = build_tiny(work)
    if "exactness" not in args.skip:
        ex = exactness_setups(tiny, n_tokens=12, mfn=20, batch_size=16)
        print(f"[compare] exactness on {len(ex)} tiny setups (ours, then circuit-tracer) ...", flush=True)
        ours = run_engine(
            "ours",
            ex,
            work / "exact" / "ours",
            threads=args.threads,
            timeout_s=900,
            mem_cap_gb=args.mem_cap_gb,
            zero_bos_errors=args.zero_bos_errors,
        )
        theirs = run_engine(
            "theirs", ex, work / "exact" / "theirs", threads=args.threads, timeout_s=900, mem_cap_gb=args.mem_cap_gb
        )
        report["versions"] = {"ours": ours.get("versions"), "circuit_tracer_env": theirs.get("versions")}
        report["exactness"] = exactness_rows(ours, theirs, ex, work / "exact")
        report["exactness_status"] = {"ours": ours["status"], "theirs": theirs["status"]}
        # where the adjacency differs: which side is right, by intervention on the frozen model
        verify = {}
        for st, row in zip(tiny, [r for r in report["exactness"] if r["run"] == "all"]):
            if row.get("adj_ok", True) or "error" in row:
                continue
            spec = next(x for x in ex if x["name"] == st.name)
            try:
                verify[st.name] = verify_by_intervention(
                    st, spec["runs"][0]["tokens"], work / "exact" / "theirs" / st.name / "all.npz", work
                )
            except Exception as exc:  # report, do not hide the table
                verify[st.name] = {"error": f"{type(exc).__name__}: {exc}"}
        report["verify_by_intervention"] = verify

    # ---------------------------------------------------------------- interventions (tiny)
    if "interventions" not in args.skip:
        iv_setups = []
        for st in tiny:
            toks, _ = token_ids(st.model_dir, 12)
            iv_setups.append(
                {
                    "name": st.name,
                    "model_dir": st.model_dir,
                    "transcoder_dir": st.transcoder_dir,
                    "runs": [],
                    "interventions": {"tokens": toks, "cases": intervention_cases(st, toks)},
                }
            )
        print(f"[compare] interventions on {len(iv_setups)} tiny setups (ours, then circuit-tracer) ...", flush=True)
        la = _loadavg()
        kw = dict(threads=args.threads, timeout_s=900, mem_cap_gb=args.mem_cap_gb)
        ours = run_engine("ours", iv_setups, work / "interventions" / "ours", **kw)
        theirs = run_engine("theirs", iv_setups, work / "interventions" / "theirs", **kw)
        report["interventions"] = intervention_rows(ours, theirs, iv_setups, work / "interventions")
        report["interventions_status"] = {
            "ours": ours["status"],
            "theirs": theirs["status"],
            "load_avg": f"{la} -> {_loadavg()}",
        }
        report["interventions_versions"] = {"ours": ours.get("versions"), "circuit_tracer_env": theirs.get("versions")}

    if not args.quick:
        # the GPT-2-small-shaped fixtures take minutes and gigabytes to build: only when used
        needs_big = "big-exactness" not in args.skip or "speed" not in args.skip
        big = build_big(work, "gpt2small", with_clt=True) if needs_big else []
        # ------------------------------------------------------------ exactness (gpt2small)
        if "big-exactness" not in args.skip:
            ex = []
            for s in big:
                toks, text = token_ids(s.model_dir, 8)
                ex.append(
                    {
                        "name": s.name,
                        "model_dir": s.model_dir,
                        "transcoder_dir": s.transcoder_dir,
                        "check_hf_logits": True,
                        "runs": [_run_spec("mfn128", toks, text, batch_size=64, max_feature_nodes=128)],
                    }
                )
            print("[compare] exactness on gpt2small (8 tokens, 128 feature rows) ...", flush=True)
            ours = run_engine(
                "ours",
                ex,
                work / "exact-big" / "ours",
                threads=args.threads,
                timeout_s=1800,
                mem_cap_gb=args.mem_cap_gb,
                zero_bos_errors=args.zero_bos_errors,
            )
            theirs = run_engine(
                "theirs",
                ex,
                work / "exact-big" / "theirs",
                threads=args.threads,
                timeout_s=1800,
                mem_cap_gb=args.mem_cap_gb,
            )
            rows = exactness_rows(ours, theirs, ex, work / "exact-big")
            report["exactness_big"] = rows
            report["exactness_big_settings"] = {"n_tokens": 8, "max_feature_nodes": 128, "batch_size": 64}

        # ------------------------------------------------------------ speed
        if "speed" not in args.skip:
            speed_rows = []
            report["speed_settings"] = {
                "max_feature_nodes": args.speed_mfn,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "cap_s": args.speed_cap_s,
            }
            for s in big:
                if s.name.endswith("clt") and args.no_clt_speed:
                    continue
                # The weights' digests (sha256 of every weight file, recorded in the store) are
                # remembered across processes (pipeline/digests.py): a machine hashes a weight set
                # once. Hash it here, untimed, so every timed run sees what a user's second run
                # sees; the first run's extra cost is reported beside it (digest_first_s).
                warm = [{"name": s.name, "model_dir": s.model_dir, "transcoder_dir": s.transcoder_dir, "runs": []}]
                warm[0]["digests_only"] = True
                rw = run_engine(
                    "ours",
                    warm,
                    work / "speed" / f"ours-{s.name}-digests",
                    threads=args.threads,
                    timeout_s=args.speed_cap_s,
                    mem_cap_gb=args.mem_cap_gb,
                )
                digest_first_s = rw.get("setups", {}).get(s.name, {}).get("digest_s")
                for n in args.lengths:
                    toks, text = token_ids(s.model_dir, n)
                    spec = _run_spec(
                        f"n{n}", toks, None, batch_size=args.batch_size, max_feature_nodes=args.speed_mfn, save="none"
                    )
                    setup = [
                        {
                            "name": s.name,
                            "model_dir": s.model_dir,
                            "transcoder_dir": s.transcoder_dir,
                            "check_hf_logits": False,
                            "runs": [spec],
                        }
                    ]
                    for rep in range(args.repeats):
                        la = _loadavg()
                        print(f"[compare] speed {s.name} {n} tokens (rep {rep}), load {la} ...", flush=True)
                        ro = run_engine(
                            "ours",
                            setup,
                            work / "speed" / f"ours-{s.name}-{n}-{rep}",
                            threads=args.threads,
                            timeout_s=args.speed_cap_s,
                            mem_cap_gb=args.mem_cap_gb,
                        )
                        rt = run_engine(
                            "theirs",
                            setup,
                            work / "speed" / f"theirs-{s.name}-{n}-{rep}",
                            threads=args.threads,
                            timeout_s=args.speed_cap_s,
                            mem_cap_gb=args.mem_cap_gb,
                        )
                        speed_rows.append(
                            {
                                "setup": s.name,
                                "n_pos": n,
                                "rep": rep,
                                "max_feature_nodes": args.speed_mfn,
                                "load_avg": f"{la} -> {_loadavg()}",
                                "ours": _single(ro, s.name, f"n{n}"),
                                "theirs": _single(rt, s.name, f"n{n}"),
                                "digest_first_s": digest_first_s,
                            }
                        )
                        report["speed"] = speed_rows
                        _write(report, args)

        # ------------------------------------------------------------ scale
        if "scale" not in args.skip:
            sc = build_big(work, "scale", with_clt=False)[0]
            scale_rows = []
            report["scale_settings"] = {
                "cap_s": args.scale_cap_s,
                "mem_cap_gb": args.mem_cap_gb,
                "batch_size": args.batch_size,
                "lengths": args.scale_lengths,
            }
            for engine in ("ours", "theirs"):
                for n in args.scale_lengths:
                    n = min(n, 1024)
                    toks, _ = token_ids(sc.model_dir, n)
                    spec = _run_spec(
                        f"n{n}", toks, None, batch_size=args.batch_size, save="none", prune=False, export=False
                    )
                    setup = [
                        {
                            "name": sc.name,
                            "model_dir": sc.model_dir,
                            "transcoder_dir": sc.transcoder_dir,
                            "check_hf_logits": False,
                            "runs": [spec],
                        }
                    ]
                    print(f"[compare] scale {engine} {n} tokens, load {_loadavg()} ...", flush=True)
                    r = run_engine(
                        engine,
                        setup,
                        work / "scale" / f"{engine}-{n}",
                        threads=args.threads,
                        timeout_s=args.scale_cap_s,
                        mem_cap_gb=args.mem_cap_gb,
                    )
                    info = _single(r, sc.name, f"n{n}")
                    row = {
                        "engine": engine,
                        "setup": sc.name,
                        "n_pos": n,
                        "status": info.get("status", "ok"),
                        **{
                            k: info.get(k) for k in ("attribute_s", "peak_rss_mb", "n_nodes", "n_active", "store_bytes")
                        },
                        "load_avg": _loadavg(),
                    }
                    if row["status"] != "ok":
                        row["log_tail"] = r.get("log_tail", "")[-600:]
                    scale_rows.append(row)
                    report["scale"] = scale_rows
                    _write(report, args)
                    if row["status"] != "ok":
                        break

    report["load_avg_end"] = _loadavg()
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    if args.reuse:  # sections not rerun now come from an earlier results file
        old = json.loads(Path(args.reuse).read_text())
        if args.scale_append and "scale" not in args.skip and old.get("scale"):
            new_keys = {(r["engine"], r["n_pos"]) for r in report.get("scale", [])}
            kept = [r for r in old["scale"] if (r["engine"], r["n_pos"]) not in new_keys]
            report["scale"] = kept + report.get("scale", [])
            report["scale_settings_earlier"] = old.get("scale_settings")
        for section in args.skip:
            for key in SECTION_KEYS[section]:
                if key in old and key not in report:
                    report[key] = old[key]
            if section == "speed" and "speed_settings" not in report and "settings" in old:
                st = old["settings"]
                report["speed_settings"] = {
                    "max_feature_nodes": st.get("speed_mfn"),
                    "batch_size": st.get("batch_size"),
                    "threads": st.get("threads"),
                    "cap_s": st.get("speed_cap_s"),
                }
            if section == "speed":
                for row in report.get("speed", []):
                    for side in ("ours", "theirs"):
                        if "status" in row[side]:
                            row[side]["status"] = _short_status(str(row[side].get("error_full") or row[side]["status"]))
            report.setdefault("reused", {})[section] = {
                "from": str(args.reuse),
                "date": old.get("date"),
                "load_avg": [old.get("load_avg_start"), old.get("load_avg_end")],
            }
    lines = build_tables(report)
    report["table"] = "\n".join(lines)
    path = _write(report, args)
    print("\n".join(lines))
    print(
        f"\nmachine: {report['machine']}\nload average: start {report['load_avg_start']}, end {report['load_avg_end']}"
        f"\ntotal {report['total_s']} s; results in {path}"
    )
    return 0


def _write(report: dict, args) -> Path:
    path = args.out or (RESULTS / ("compare-quick.json" if args.quick else "compare.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
