"""The state swap's random baseline taken exhaustively, and how far a perturbation at the city
moves the organism's answer.

    python bench/swap_random_pool.py            # after `dvc repro` (reads results/*/report/report.json)
    python bench/swap_random_pool.py --kind plt --norms 10 25 50 100

1. For every state swap of the main job's reports: the pools the random baseline draws from
   (per (layer, position) cell, the other features active there: the source's on the prompt,
   the target's on the donor, as ``pipeline.analysis.selection.random_like`` draws them), and
   every draw of the selected sets' shape (all combinations, not a sample), each run as the
   experiment runs (the same factors and constrained layers, circuit-tracer's semantics). The
   share that flips to the expected answer is the rate the sampled baseline estimates; the
   features that every flipping draw holds name what the baseline counts. The selected sets
   themselves are rerun as a check that this script runs the experiment as the stage did.
2. Perturbations added to block 0's MLP output at the city of every canonical English two-hop
   prompt of the world: random directions, the mean city output's direction (the part every
   city shares) and its negative, at several norms; how many answers change, and to what. And
   the model's default answer: what it says when the city's output is the mean city output (no
   state), where a draw that erases the state rather than moving it lands.

Writes bench/results/swap_random_pool.json. The library does the work; this script enumerates
and counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import load_organism_replacement, machine_info  # noqa: E402
from pipeline._io import write_json  # noqa: E402
from pipeline.organism.train_model import encode_texts, load_organism  # noqa: E402


def top_answer(model, prompt: str, interventions: list, layers) -> str:
    logits, _ = model.feature_intervention(prompt, interventions, constrained_layers=layers)
    return model.tokenizer.decode([int(logits[-1].argmax())]).strip()


def pools(chosen: list[dict], activations: torch.Tensor) -> list[tuple[tuple, int, list[int]]]:
    """Per (layer, pos, at) cell of ``chosen``: the cell, how many it chose there, and the other
    features active there (the random baseline's pool)."""
    by_cell: dict[tuple, list[int]] = {}
    for c in chosen:
        by_cell.setdefault((c["layer"], c["pos"], c["at"]), []).append(c["feature"])
    return [
        (cell, len(fs), sorted(set(torch.nonzero(activations[cell[0], cell[1]] > 0).flatten().tolist()) - set(fs)))
        for cell, fs in sorted(by_cell.items())
    ]


def every_draw(cells: list[tuple[tuple, int, list[int]]]):
    """Every feature set of the cells' shape: per cell, every combination of as many pool
    features (fewer where the pool is smaller)."""
    per_cell = [list(itertools.combinations(pool, min(k, len(pool)))) for _, k, pool in cells]
    for combo in itertools.product(*per_cell):
        yield [
            {"layer": cell[0], "pos": cell[1], "at": cell[2], "feature": f}
            for (cell, _, _), fs in zip(cells, combo)
            for f in fs
        ]


def swap_draws(model, report: dict, e: dict, spec: dict, prompt_id: str) -> dict:
    """Every random draw of one swap, run as the experiment."""
    layers = spec["constrained_layers"]
    _, acts = model.feature_intervention(report["prompt"], [])
    _, donor_acts = model.feature_intervention(e["donor"]["prompt"], [])

    def run(source: list[dict], target: list[dict]) -> str:
        ivs = [
            (c["layer"], c["at"], c["feature"], spec["source_factor"] * float(acts[c["layer"], c["pos"], c["feature"]]))
            for c in source
        ]
        ivs += [
            (
                c["layer"],
                c["at"],
                c["feature"],
                spec["target_factor"] * float(donor_acts[c["layer"], c["pos"], c["feature"]]),
            )
            for c in target
        ]
        return top_answer(model, report["prompt"], ivs, layers)

    src, tgt = e["selected"]["source"], e["selected"]["target"]
    selected_after = run(src, tgt)
    if selected_after != e["after"][0]["token"]:
        raise SystemExit(
            f"{prompt_id}: the selected swap gives {selected_after!r} here, the report {e['after'][0]['token']!r}"
        )
    s_cells, t_cells = pools(src, acts), pools(tgt, donor_acts)
    answers: Counter = Counter()
    held: Counter = Counter()  # per feature: the draws that hold it, and the flipping ones
    held_flipping: Counter = Counter()
    for rs in every_draw(s_cells):
        for rt in every_draw(t_cells):
            answer = run(rs, rt)
            answers[answer] += 1
            names = [f"source {c['feature']}" for c in rs] + [f"target {c['feature']}" for c in rt]
            held.update(names)
            if answer == e["expected_after"]:
                held_flipping.update(names)
    n, n_flipped = sum(answers.values()), answers[e["expected_after"]]
    return {
        "prompt_id": prompt_id,
        "experiment": e["name"],
        "expected_after": e["expected_after"],
        "selected": {"source": [c["feature"] for c in src], "target": [c["feature"] for c in tgt]},
        "pools": {
            side: [{"cell": list(cell), "size": len(pool), "features": pool} for cell, _, pool in cells]
            for side, cells in (("source", s_cells), ("target", t_cells))
        },
        "n_draws": n,
        "n_flipped": n_flipped,
        "flip_rate": round(n_flipped / n, 4) if n else None,
        "sampled_rate": e["baselines"].get("random", {}).get("flip_rate"),
        "answers": dict(answers.most_common()),
        # per feature of the pools: the flip rate of the draws that hold it, and of those that do not
        "flip_rate_with_feature": {
            name: [
                round(held_flipping[name] / held[name], 3),
                round((n_flipped - held_flipping[name]) / max(1, n - held[name]), 3),
            ]
            for name in sorted(held, key=lambda k: -held_flipping[k] / held[k])
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", type=Path, default=REPO / "models" / "organism")
    ap.add_argument("--results", type=Path, default=REPO / "results", help="the main job's results folder")
    ap.add_argument("--kind", choices=("plt", "clt"), default="plt", help="the transcoders the main job used")
    ap.add_argument("--norms", type=float, nargs="+", default=[10.0, 25.0, 50.0, 100.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "swap_random_pool.json")
    args = ap.parse_args(argv)
    world, model = load_organism_replacement(args.organism, args.kind, args.threads)

    # 1. every random draw of every swap
    swaps = []
    for path in sorted(args.results.glob("*/report/report.json")):
        report = json.loads(path.read_text())
        specs = {e["name"]: e for e in report["spec"]["experiments"]}
        for e in report["experiments"]:
            if e["kind"] == "swap" and e["status"] == "ran":
                s = swap_draws(model, report, e, specs[e["name"]], path.parent.parent.name)
                swaps.append(s)
                print(
                    f"{s['prompt_id']} {s['experiment']}: pools {[c['size'] for c in s['pools']['source']]} / "
                    f"{[c['size'] for c in s['pools']['target']]}, {s['n_flipped']}/{s['n_draws']} draws flip "
                    f"(sampled {s['sampled_rate']}); flip rate with / without the top features: "
                    f"{dict(list(s['flip_rate_with_feature'].items())[:3])}",
                    flush=True,
                )

    # 2. perturbations at the city
    hf, tokenizer, _ = load_organism(args.organism / "model")
    prompts = [s for s in world.sentences("two_hop", split="all", canonical_only=True) if s.language == "en"]
    ids, lengths = encode_texts(tokenizer, [s.prompt for s in prompts])
    rows, city = torch.arange(len(ids)), torch.tensor([1 + s.prompt.split().index(s.city) for s in prompts])
    mlp0 = hf.transformer.h[0].mlp

    def answers_with(added: torch.Tensor) -> list[str]:
        def hook(_m, _i, out):
            out = out.clone()
            out[rows, city] += added
            return out

        handle = mlp0.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = hf(input_ids=ids).logits
        finally:
            handle.remove()
        return tokenizer.convert_ids_to_tokens(logits[rows, lengths - 1].argmax(-1).tolist())

    seen: dict[str, torch.Tensor] = {}
    handle = mlp0.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out))
    with torch.no_grad():
        hf(input_ids=ids)
    handle.remove()
    y = seen["y"][rows, city]
    common = y.mean(0) / y.mean(0).norm()
    clean = answers_with(torch.zeros_like(y))
    # the model's default: its answers when every city's output is the mean city output, which
    # says "a city" and not which; a perturbation that erases the state lands there
    default = Counter(answers_with(y.mean(0) - y))
    print(f"answers with the mean city output at every city: {dict(default.most_common(4))}", flush=True)
    g = torch.Generator().manual_seed(0)
    perturbations = []
    for norm in args.norms:
        random_dirs = torch.randn(y.shape, generator=g)
        for name, direction in (
            ("random", random_dirs / random_dirs.norm(dim=-1, keepdim=True)),
            ("common", common.expand_as(y)),
            ("-common", -common.expand_as(y)),
        ):
            after = answers_with(norm * direction)
            changed = Counter(a for a, c in zip(after, clean) if a != c)
            perturbations.append(
                {
                    "direction": name,
                    "norm": norm,
                    "n_changed": sum(changed.values()),
                    "to": dict(changed.most_common(4)),
                }
            )
            print(
                f"city perturbation {name:>7} norm {norm:>5}: {sum(changed.values())}/{len(ids)} answers change",
                flush=True,
            )

    result = {
        "kind": args.kind,
        "machine": machine_info(args.threads),
        "swaps": swaps,
        "city_output": {
            "n_prompts": len(ids),
            "mean_norm": round(float(y.norm(dim=-1).mean()), 2),
            "common_norm": round(float(y.mean(0).norm()), 2),
            "answers_with_mean_output": dict(default.most_common()),
        },
        "perturbations": perturbations,
    }
    write_json(args.out, result)
    print(args.out)


if __name__ == "__main__":
    main()
