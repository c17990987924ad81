"""Run circuit-tracer 0.5.0 on local weights, for bench/compare.py.

Runs inside circuit-tracer's own virtual environment (bench/circuit_tracer_env.sh), never in
the project's: it imports ``circuit_tracer`` and TransformerLens 2 and nothing from ``pipeline``.

    bench/.ct-venv/bin/python bench/ct_runner.py JOB.json

JOB.json::

    {"out_dir": ..., "threads": 2, "scan": "bench", "device": "cpu" | "cuda", "dtype": "float32",
     "setups": [{"name": ..., "model_dir": ..., "transcoder_dir": ..., "check_hf_logits": true,
                 "runs": [{"name": ..., "tokens": [ids, BOS first], "prompt": "text" | null,
                           "max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 256,
                           "max_feature_nodes": null, "update_interval": 4,
                           "node_threshold": 0.8, "edge_threshold": 0.98,
                           "save": "full" | "none", "prune": true, "export": true}]}]}

Writes ``out_dir/result.json`` (rewritten after every run, so a run killed by the time cap
still leaves the finished ones), ``out_dir/<setup>/<run>.npz`` (dense adjacency and node
tables, graph order) and ``out_dir/<setup>/graphs/<run>.json`` (circuit-tracer's
``create_graph_files``). Times are wall-clock seconds, memory is the process's peak RSS
(``ru_maxrss``), both measured here, in the same way as for our engine; on a GPU also the
peak GPU memory of each ``attribute`` call (``torch.cuda.max_memory_allocated``).
``device`` and ``dtype`` (default cpu, float32) are where and in what the model and the
transcoders are loaded (bench/gpu.py).

Loading without the hub (HF_HUB_OFFLINE=1):

* the model: TransformerLens 2 accepts only names from its official list, so
  ``get_official_model_name`` is wrapped to let an existing local directory through; the
  directory is reached through a neutral symlink name (TransformerLens 2 picks the architecture
  from substrings such as "llama" in the name and would then skip reading config.json).
  circuit-tracer's ``from_pretrained_and_transcoders`` keeps fold_ln, centring of writing
  weights and of the unembedding off, so its logits equal the Hugging Face model's.
* the transcoders: ``config.yaml`` is read here and circuit-tracer's own loaders
  (``load_transcoder_set`` / ``load_clt``) are called with absolute paths (circuit-tracer
  resolves relative paths against the working directory) and dtype float32 (its CLT loader
  defaults to bfloat16).

A setup may also carry ``"interventions": {"tokens": [...], "cases": [...]}`` (see
``run_interventions``): circuit-tracer's ``feature_intervention`` / ``feature_intervention_generate``
with its defaults, logits and activations saved to ``out_dir/<setup>/interventions.npz``.

Prompts are passed as token ids (BOS first) so both engines see identical input ids:
circuit-tracer's own string tokenization prepends the first *non-zero* special-token id, so a
tokenizer whose BOS id is 0 gets another special token there. Its string tokenization is
recorded next to the given ids (``ct_string_tokens``) to show this.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import resource  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("circuit-tracer", "torch", "transformer-lens", "transformers", "nnsight", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def load_transcoders(transcoder_dir: Path, scan: str, device: str = "cpu", dtype: str = "float32"):
    import torch
    import yaml

    cfg = yaml.safe_load((transcoder_dir / "config.yaml").read_text())
    kind = cfg["model_kind"]
    if kind == "transcoder_set":
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

        paths = {}
        for i, p in enumerate(cfg["transcoders"]):
            path = Path(p)
            paths[i] = str(path if path.is_absolute() else (transcoder_dir / path).resolve())
        tc = load_transcoder_set(
            paths,
            scan=scan,
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            device=torch.device(device),
            dtype=getattr(torch, dtype),
        )
    elif kind == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        tc = load_clt(
            str(transcoder_dir.resolve()),
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            scan=scan,
            device=torch.device(device),
            dtype=getattr(torch, dtype),
        )
    else:
        raise ValueError(f"unknown model_kind {kind!r} in {transcoder_dir}/config.yaml")
    return tc, kind


#: TransformerLens 2 builds Gemma-2 only from its official names, with the shapes written into
#: its code: a local Gemma-2 checkpoint of one of those shapes (n_layers, d_model) loads as that
#: name, its weights and tokenizer passed in (nothing is downloaded)
TL2_GEMMA2 = {(26, 2304): "google/gemma-2-2b", (42, 3584): "google/gemma-2-9b", (46, 4608): "google/gemma-2-27b"}


def load_model(model_dir: Path, transcoders, link_dir: Path, device: str = "cpu", dtype: str = "float32"):
    """circuit-tracer's ReplacementModel on a local Hugging Face directory, offline."""
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from circuit_tracer import ReplacementModel

    link, overrides = neutral_model_dir(model_dir, link_dir)
    hf_config = json.loads((link / "config.json").read_text())
    if hf_config.get("model_type") == "gemma2":
        return load_gemma2(link, hf_config, transcoders, overrides, device, dtype)
    official = loading.get_official_model_name

    def local_or_official(name: str) -> str:
        return name if Path(name).is_dir() and (Path(name) / "config.json").exists() else official(name)

    loading.get_official_model_name = local_or_official
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ReplacementModel.from_pretrained_and_transcoders(
                str(link),
                transcoders,
                backend="transformerlens",
                device=torch.device(device),
                dtype=getattr(torch, dtype),
            )
    finally:
        loading.get_official_model_name = official
    model.bench_config_overrides = overrides
    return model


def load_gemma2(link: Path, hf_config: dict, transcoders, overrides: dict, device: str, dtype: str):
    """A local Gemma-2 checkpoint as TransformerLens 2 can build it (:data:`TL2_GEMMA2`)."""
    import torch
    from circuit_tracer import ReplacementModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shape = (hf_config["num_hidden_layers"], hf_config["hidden_size"])
    name = TL2_GEMMA2.get(shape)
    if name is None:
        raise ValueError(
            f"TransformerLens 2 builds Gemma-2 only in its official shapes {sorted(TL2_GEMMA2)} "
            f"(n_layers, d_model); this checkpoint is {shape}"
        )
    hf_model = AutoModelForCausalLM.from_pretrained(str(link), torch_dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(link))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ReplacementModel.from_pretrained_and_transcoders(
            name,
            transcoders,
            backend="transformerlens",
            device=torch.device(device),
            dtype=getattr(torch, dtype),
            hf_model=hf_model,
            tokenizer=tokenizer,
        )
    del hf_model
    model.bench_config_overrides = {**overrides, "loaded_as": name}
    return model


def neutral_model_dir(model_dir: Path, link_dir: Path) -> tuple[Path, dict]:
    """``link_dir/hf_model``: symlinks to the model's files under a neutral name.

    config.json is copied; a GPT-2 config written by transformers 5 has no ``n_ctx`` (only
    ``n_positions``), which TransformerLens 2 reads, so it is added with the same value.
    tokenizer_config.json is copied; transformers 5 names the fast tokenizer class
    ``TokenizersBackend``, which transformers 4 calls ``PreTrainedTokenizerFast``.
    """
    out = link_dir / "hf_model"
    out.mkdir()
    overrides = {}
    for f in model_dir.resolve().iterdir():
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg and "n_positions" in cfg:
                cfg["n_ctx"] = overrides["n_ctx"] = cfg["n_positions"]
            (out / f.name).write_text(json.dumps(cfg))
        elif f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                # transformers 5's generic class name; transformers 4 calls it this:
                cfg["tokenizer_class"] = overrides["tokenizer_class"] = "PreTrainedTokenizerFast"
            (out / f.name).write_text(json.dumps(cfg))
        else:
            (out / f.name).symlink_to(f)
    return out, overrides


def hf_logits_check(model, model_dir: Path, tokens) -> dict:
    """Max |logit difference| between circuit-tracer's model and the Hugging Face model."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        ours = model(tokens[None])[0].cpu().float()
    diff = (ours - ref).abs().max().item()
    del hf
    return {"max_abs_diff": diff, "max_abs_logit": ref.abs().max().item()}


def _np(t, dtype):
    """A tensor on any device, in any dtype (bfloat16 included), as a numpy array of ``dtype``."""
    return t.detach().cpu().float().numpy().astype(dtype) if t.is_floating_point() else t.detach().cpu().numpy()


def run_one(model, spec: dict, out_dir: Path, scan: str) -> dict:
    import numpy as np
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    info: dict = {"n_pos": int(tokens.numel())}
    if spec.get("prompt"):
        info["ct_string_tokens"] = model.ensure_tokenized(spec["prompt"]).tolist()

    on_gpu = torch.cuda.is_available() and str(model.cfg.device).startswith("cuda")
    if on_gpu:  # the peak of this call alone (resident weights included), as for our engine
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    graph = attribute(
        tokens,
        model,
        max_n_logits=spec.get("max_n_logits", 10),
        desired_logit_prob=spec.get("desired_logit_prob", 0.95),
        batch_size=spec.get("batch_size", 256),
        max_feature_nodes=spec.get("max_feature_nodes"),
        update_interval=spec.get("update_interval", 4),
        verbose=False,
    )
    if on_gpu:
        torch.cuda.synchronize()
    info["attribute_s"] = time.perf_counter() - t0
    if on_gpu:
        info["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    A = graph.adjacency_matrix
    info.update(
        n_nodes=int(A.shape[0]),
        n_active=int(graph.active_features.shape[0]),
        n_selected=int(graph.selected_features.numel()),
        n_logits=len(graph.logit_targets),
        peak_rss_mb_after_attribute=peak_rss_mb(),
    )
    arrays = {
        "input_tokens": _np(graph.input_tokens, np.int64),
        "active_features": _np(graph.active_features, np.int64),
        "activation_values": _np(graph.activation_values, np.float32),
        "selected_features": _np(graph.selected_features, np.int64),
        "logit_tokens": np.array([t.vocab_idx for t in graph.logit_targets], dtype=np.int64),
        "logit_probabilities": _np(graph.logit_probabilities, np.float32),
    }
    if spec.get("prune", True):
        nt, et = spec.get("node_threshold", 0.8), spec.get("edge_threshold", 0.98)
        t0 = time.perf_counter()
        node_mask, edge_mask, cumulative = prune_graph(graph, nt, et)
        info["prune_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        replacement, completeness = compute_graph_scores(graph)
        info["scores_s"] = time.perf_counter() - t0
        info.update(
            replacement_score=replacement,
            completeness_score=completeness,
            n_kept_nodes=int(node_mask.sum()),
            n_kept_edges=int(edge_mask.sum()),
        )
        rows, cols = np.nonzero(edge_mask.cpu().numpy())
        arrays.update(
            node_mask=node_mask.cpu().numpy(),
            edge_rows=rows.astype(np.int64),
            edge_cols=cols.astype(np.int64),
            cumulative_scores=_np(cumulative, np.float64),
        )
        if spec.get("export", True):
            t0 = time.perf_counter()
            create_graph_files(
                graph, spec["name"], str(out_dir / "graphs"), scan=scan, node_threshold=nt, edge_threshold=et
            )
            info["export_s"] = time.perf_counter() - t0
    if spec.get("save", "full") == "full":
        arrays["adjacency"] = _np(A, np.float32)
    np.savez(out_dir / f"{spec['name']}.npz", **arrays)
    del graph, A
    info["peak_rss_mb"] = peak_rss_mb()
    return info


def decode_interventions(items: list) -> list[tuple]:
    """JSON ``[layer, pos, feature, value]`` rows as intervention tuples; ``pos`` is an int or
    ``{"slice": [start, stop]}`` (stop null: open-ended)."""
    out = []
    for layer, pos, feature, value in items:
        if isinstance(pos, dict):
            pos = slice(*pos["slice"])
        out.append((int(layer), pos, int(feature), float(value)))
    return out


def text_for_free_generation(model, tokens) -> tuple[str, dict]:
    """A text and ``generate`` keyword arguments that give exactly ``tokens`` (BOS first) both
    through ``model.tokenizer`` and through ``generate``'s own tokenization.

    circuit-tracer 0.5.0's ``feature_intervention_generate`` with ``freeze_attention=False``
    takes the prompt length from ``inputs.size(0)`` for a token tensor, which is the batch
    dimension of the (1, n_pos) batch ``generate`` needs, so that case fails ("index out of
    bounds"); for a string it takes the length from the tokenizer. So this case gets text: the
    words (when the tokenizer adds BOS itself) or the BOS token's string, then the words, with
    ``prepend_bos=False``.
    """
    tok = model.tokenizer
    ids = tokens.tolist()
    words = " ".join(tok.convert_ids_to_tokens(ids[1:]))
    for text, kwargs in ((words, {}), (f"{tok.bos_token} {words}", {"prepend_bos": False})):
        if tok(text).input_ids == ids and model.to_tokens(text, **kwargs)[0].tolist() == ids:
            return text, kwargs
    raise RuntimeError("no text tokenizes to the given ids both ways")


def run_interventions(model, spec: dict, out_dir: Path) -> dict:
    """circuit-tracer's interventions with its own defaults; only the arguments a case names are
    passed (constrained_layers, freeze_attention; max_new_tokens and greedy decoding for
    generation). Saves ``<case>.logits`` (n_pos, d_vocab), ``<case>.activations`` and, for
    generation, ``<case>.tokens``, plus the clean run's ``clean.logits``."""
    import numpy as np
    import torch

    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    arrays: dict = {}
    info: dict = {}
    with torch.no_grad():
        arrays["clean.logits"] = _np(model(tokens)[0], np.float32)
    for case in spec["cases"]:
        kwargs = {}
        if case.get("constrained_layers") is not None:
            kwargs["constrained_layers"] = range(*case["constrained_layers"])
        if "freeze_attention" in case:
            kwargs["freeze_attention"] = case["freeze_attention"]
        ivs = decode_interventions(case["interventions"])
        name = case["name"]
        t0 = time.perf_counter()
        try:
            if case.get("generate"):
                # a (1, n_pos) batch: HookedTransformer.generate takes batches
                inputs, extra = tokens[None], {}
                if case.get("freeze_attention") is False:
                    inputs, extra = text_for_free_generation(model, tokens)
                    info.setdefault("free_generation_input", {"text": inputs, **extra})
                out, logits, acts = model.feature_intervention_generate(
                    inputs,
                    ivs,
                    do_sample=False,
                    max_new_tokens=case["generate"]["max_new_tokens"],
                    stop_at_eos=False,
                    verbose=False,
                    return_type="tokens",
                    **kwargs,
                    **extra,
                )
                arrays[f"{name}.tokens"] = np.asarray(out).reshape(-1).astype(np.int64)
            else:
                logits, acts = model.feature_intervention(tokens, ivs, **kwargs)
                logits = logits[0]
            arrays[f"{name}.logits"] = _np(logits, np.float32)
            arrays[f"{name}.activations"] = _np(acts.to_dense(), np.float32)
            info[name] = {"s": time.perf_counter() - t0}
        except Exception as exc:  # report it and go on with the other cases
            info[name] = {"error": f"{type(exc).__name__}: {exc}"}
    np.savez(out_dir / "interventions.npz", **arrays)
    return info


def main(job_path: str) -> None:
    import torch

    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(job.get("threads", 2)))
    scan = job.get("scan", "bench")
    result: dict = {
        "engine": "circuit-tracer",
        "versions": versions(),
        "device": job.get("device", "cpu"),
        "dtype": job.get("dtype", "float32"),
        "setups": {},
    }

    def save() -> None:
        result["peak_rss_mb"] = peak_rss_mb()
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out_dir / "result.json")

    t_start = time.perf_counter()
    for setup in job["setups"]:
        res: dict = {"runs": {}}
        result["setups"][setup["name"]] = res
        setup_dir = out_dir / setup["name"]
        (setup_dir / "graphs").mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ctm") as link_dir:
            device, dtype = job.get("device", "cpu"), job.get("dtype", "float32")
            transcoders, kind = load_transcoders(Path(setup["transcoder_dir"]), scan, device, dtype)
            model = load_model(Path(setup["model_dir"]), transcoders, Path(link_dir), device, dtype)
            res.update(
                load_s=time.perf_counter() - t0,
                transcoder_kind=kind,
                config_overrides=model.bench_config_overrides,
                peak_rss_mb_after_load=peak_rss_mb(),
            )
            if setup.get("check_hf_logits") and setup["runs"]:
                tokens = torch.tensor(setup["runs"][0]["tokens"], dtype=torch.long)
                res["hf_logits"] = hf_logits_check(model, Path(setup["model_dir"]), tokens)
            save()
            for spec in setup["runs"]:
                try:
                    res["runs"][spec["name"]] = run_one(model, spec, setup_dir, scan)
                except Exception as exc:  # report it and go on with the other runs
                    res["runs"][spec["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
                save()
            if setup.get("interventions"):
                res["interventions"] = run_interventions(model, setup["interventions"], setup_dir)
                save()
            del model, transcoders
    result["total_s"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
