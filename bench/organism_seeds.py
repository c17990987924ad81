"""The organism's case studies over several seeds: the intermediate-node rate, the state-swap flip
rate and the language-steer switch rate, each with its baselines, for PLT and CLT; mean and worst.

    python bench/organism_seeds.py                    # seeds 0 1 2 (about 25 min on 2 cores)
    python bench/organism_seeds.py --seeds 0 --quick  # one seed, a few prompts (smoke test)
    python bench/organism_seeds.py --transcoder 'matryoshka=[16, 64]' --out OTHER.json  # a variant
    python bench/organism_seeds.py --train mlp_out_l2=0.001 --out OTHER.json  # a training variant
    python bench/organism_seeds.py --model d_mlp=128 --out OTHER.json        # an architecture variant
    python bench/organism_seeds.py --world n_states=16 --out OTHER.json      # a world variant
    CIRCUIT_PIPELINE_ARITHMETIC=native python bench/organism_seeds.py --out OTHER.json  # this CPU's own arithmetic

Per seed, the organism is built from that seed (world split, model and transcoders); then, for
each transcoder set, the selectivity table over the world's labeled prompts, and for a sample of
two-hop prompts (every state, two cities each, English) the attribution graph, its pruned
circuit and the intervene checks of the default prompt set's recipes (pipeline.analysis.evaluation):
the constrained state swap at the city (state features x-4, a donor city of the next state x10,
layer 0), and on toy-language prompts (one city per state) the open-ended x-2 steer of the
toy-language features (those active on the prompt, as the default prompt set selects them, and
only those the pruned circuit kept). The library's own code runs everything; this script only loops and counts.
Writes bench/results/organism_seeds.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import machine_info, pipeline_version  # noqa: E402
from pipeline._io import write_json  # noqa: E402
from pipeline.analysis.evaluation import evaluate, study_metrics  # noqa: E402
from pipeline.analysis.evaluation_spec import EvaluationSpec, PromptContext  # noqa: E402
from pipeline.analysis.selectivity import compute_selectivity  # noqa: E402
from pipeline.devices import arithmetic_in_force, mkl_cbwr_mode, pin_cpu_arithmetic  # noqa: E402
from pipeline.engine.attribution import attribute  # noqa: E402
from pipeline.engine.replacement import ReplacementModel  # noqa: E402
from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph  # noqa: E402
from pipeline.graph.pruning import prune_graph  # noqa: E402
from pipeline.organism.build import OrganismConfig, build_organism  # noqa: E402
from pipeline.organism.config import ModelConfig, TrainConfig, TranscoderTrainConfig  # noqa: E402
from pipeline.organism.world import WorldConfig, make_world  # noqa: E402


def swap_experiment(donor_id: str, answer: str, donor_answer: str, select: str = "contrast") -> dict:
    """The default prompt set's constrained state swap at the city; ``select`` names the rule
    (``contrast``, the default prompt set's, or ``selective``)."""
    rule = {"select": select, "label": "state", "role": "city"}
    return {
        "name": "state_swap",
        "group": "state_swap",
        "kind": "swap",
        "constrained_layers": [0],
        "source": [{**rule, "in_graph": True}],
        "source_factor": -4,
        "target": [rule],
        "target_factor": 10,
        "donor": donor_id,
        "expected_before": answer,
        "expected_after": donor_answer,
    }


def steer_experiment(answer: str, *, in_graph: bool = False) -> dict:
    """The default prompt set's steer (the toy-language-selective features active on the
    prompt), or with ``in_graph`` only those its pruned circuit kept (group
    ``language_steer_in_graph``)."""
    rule = {"select": "selective", "label": "language", "value": "toy", "role": "any", "in_graph": in_graph}
    name = "language_steer_in_graph" if in_graph else "language_steer"
    return {
        "name": name,
        "group": name,
        "kind": "steer",
        "open_ended": True,
        "max_new_tokens": 5,
        "source": [rule],
        "source_factor": -2,
        "expected_before": answer,
        "expected_language": "en",
    }


def prompts_of(world, n_cities: int, swap_select: str = "contrast") -> dict[str, dict]:
    """id -> labeled prompt with its experiments: English two-hop prompts (n_cities per state)
    with a state swap from the same position of the next state, toy ones (one per state) with
    the language steer."""
    bank = {(p["labels"]["city"], p["labels"]["language"]): p for p in world.labeled_prompts()}
    states = world.states
    out: dict[str, dict] = {}
    for i, state in enumerate(states):
        donor_state = states[(i + 1) % len(states)]
        for j, city in enumerate(state.cities[:n_cities]):
            donor_city = donor_state.cities[j % len(donor_state.cities)]
            pid, donor_id = f"{city}_en", f"{donor_city}_en"
            item, donor = bank[(city, "en")], bank[(donor_city, "en")]
            out[pid] = {
                **item,
                "experiments": [swap_experiment(donor_id, item["answer"], donor["answer"], swap_select)],
            }
            out.setdefault(donor_id, {**donor, "experiments": []})
        toy = bank[(state.cities[0], "toy")]
        steers = [steer_experiment(toy["answer"]), steer_experiment(toy["answer"], in_graph=True)]
        out[f"{state.cities[0]}_toy"] = {**toy, "experiments": steers}
    return out


def run_kind(out: Path, kind: str, world, prompts: dict[str, dict], work: Path) -> dict:
    model = ReplacementModel.from_pretrained(out / "model", out / kind)
    bank = world.labeled_prompts()
    table = compute_selectivity(model, bank)
    reports, states = [], []
    for pid, item in prompts.items():
        if not item["experiments"]:
            continue
        states.append(item["labels"]["state"])
        graph = attribute(item["prompt"], model, store=work / f"{kind}_{pid}.zarr", verbose=False)
        save_pruned_graph(graph, prune_graph(graph, 0.8, 0.98), work / f"{kind}_{pid}.npz")
        pruned = load_pruned_graph(work / f"{kind}_{pid}.npz")
        spec = EvaluationSpec(experiments=item["experiments"], top_k=0, faithfulness=False, max_new_tokens=0)
        context = PromptContext(
            prompt=item, prompts=prompts, selectivity=table, bank=bank, word_languages=world.word_languages()
        )
        reports.append(evaluate(model, pruned, spec, prompt=item["prompt"], context=context))
    metrics = study_metrics(reports)
    return {
        "intermediate_node_rate": metrics["intermediate_node_rate"],
        "n_intermediate_checked": metrics["n_intermediate_checked"],
        "by_group": metrics["by_group"],
        "steer_answer_kept_rate": steer_answer_kept(world, prompts, reports),
        "selective_features": table.n_selective(),
        # per state swap: the selected sets' sizes beside the random draws' flips (the draws
        # have the selected sets' shape, so larger sets make larger random sets)
        "swaps": [
            {
                "prompt": r["prompt"],
                "state": state,
                "n_source": e["n_source_features"],
                "n_target": e["n_target_features"],
                "flipped": e.get("flipped"),
                "random_flipped": e["baselines"].get("random", {}).get("n_flipped"),
            }
            for r, state in zip(reports, states)
            for e in r["experiments"]
            if e["group"] == "state_swap"
        ],
    }


def random_flips_by_state(swaps: list[dict]) -> dict | None:
    """How the swaps' random flips gather by the prompt's state (whose two prompts share a donor
    state): the share of the flips' variance over the swaps that lies between states, and the
    share of all flips held by the 3 states with the most."""
    by_state: dict[str, list[float]] = {}
    for sw in swaps:
        if sw["random_flipped"] is not None:
            by_state.setdefault(sw["state"], []).append(float(sw["random_flipped"]))
    flips = [x for xs in by_state.values() for x in xs]
    if not flips or not sum(flips):
        return None
    mean = sum(flips) / len(flips)
    total = sum((x - mean) ** 2 for x in flips)
    within = sum((x - sum(xs) / len(xs)) ** 2 for xs in by_state.values() for x in xs)
    top = sorted((sum(xs) for xs in by_state.values()), reverse=True)[:3]
    return {
        "between_state_variance_share": round(1 - within / total, 3) if total else None,
        "top3_states_share": round(sum(top) / sum(flips), 3),
    }


def steer_answer_kept(world, prompts: dict[str, dict], reports: list[dict]) -> float | None:
    """Share of the default steers (group ``language_steer``) whose steered first token is the
    clean answer's English twin (``Easton`` -> ``Austin``): the language switched and the answer
    survived, which the steer's own measure (the continuation's language) does not ask."""
    english = {world.spell(s.capital, "toy"): s.capital for s in world.states}
    english.update({world.spell(s.name, "toy"): s.name for s in world.states})
    kept = n = 0
    for report in reports:
        for e in report["experiments"]:
            if e["group"] == "language_steer" and e["after"]:
                n += 1
                kept += e["after"][0]["token"] == english.get(e["expected_before"])
    return round(kept / n, 4) if n else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cities", type=int, default=2, help="English two-hop prompts per state")
    ap.add_argument("--quick", action="store_true", help="3 states, 1 city each, short training (smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--transcoder",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a transcoder training setting for both sets (YAML value), e.g. --transcoder 'matryoshka=[16, 64]'",
    )
    ap.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model training setting (YAML value), e.g. --train mlp_out_l2=0.001",
    )
    ap.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model architecture setting (YAML value), e.g. --model d_mlp=128",
    )
    ap.add_argument(
        "--world",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a world setting (YAML value), e.g. --world n_states=16",
    )
    ap.add_argument(
        "--swap-select",
        choices=("contrast", "selective"),
        default="contrast",
        help="the swap's selection rule (the default prompt set's: contrast)",
    )
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work" / "organism_seeds")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "organism_seeds.json")
    args = ap.parse_args(argv)
    overrides = dict(_setting(text, TranscoderTrainConfig, "--transcoder") for text in args.transcoder)
    train_overrides = dict(_setting(text, TrainConfig, "--train") for text in args.train)
    model_overrides = dict(_setting(text, ModelConfig, "--model") for text in args.model)
    world_overrides = dict(_setting(text, WorldConfig, "--world") for text in args.world)
    pin_cpu_arithmetic()  # as the stages do: the trained bits (and the rates) depend on MKL's code path
    torch.set_num_threads(args.threads)
    t0 = time.time()
    machine = machine_info(args.threads) | {"mkl_cbwr_mode": mkl_cbwr_mode(), "arithmetic": arithmetic_in_force()}
    results: dict = {"seeds": {}, "machine": machine, "pipeline": pipeline_version(), "transcoder_settings": overrides}
    results["train_settings"] = train_overrides
    results["model_settings"] = model_overrides
    results["world_settings"] = world_overrides
    results["swap_select"] = args.swap_select
    for seed in args.seeds:
        world_cfg = WorldConfig(**({"seed": seed, "n_states": 3 if args.quick else 12} | world_overrides))
        cfg = OrganismConfig(
            world=world_cfg,
            model=ModelConfig(**model_overrides),
            train=TrainConfig(**({"seed": seed, "steps": 60 if args.quick else TrainConfig.steps} | train_overrides)),
            plt=TranscoderTrainConfig(
                **({"seed": seed, "steps": 60 if args.quick else TranscoderTrainConfig.steps} | overrides)
            ),
            clt=TranscoderTrainConfig(
                **(
                    {"seed": seed, "skip": False, "steps": 60 if args.quick else TranscoderTrainConfig.steps}
                    | overrides
                )
            ),
            threads=args.threads,
        )
        out = args.workdir / f"seed{seed}"
        metrics = build_organism(out, cfg, progress=False)
        world = make_world(world_cfg)
        prompts = prompts_of(world, 1 if args.quick else args.cities, args.swap_select)
        row = {"two_hop_heldout_accuracy": metrics["model"]["two_hop_heldout_accuracy"]}
        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            for kind in ("plt", "clt"):
                row[kind] = run_kind(out, kind, world, prompts, Path(work))
                row[kind]["random_by_state"] = random_flips_by_state(row[kind]["swaps"])
                g = row[kind]["by_group"]
                print(
                    f"seed {seed} {kind}: intermediate node {row[kind]['intermediate_node_rate']}  "
                    f"state swap {g.get('state_swap', {}).get('flip_rate')}  "
                    f"language steer {g.get('language_steer', {}).get('flip_rate')} "
                    f"(in graph {g.get('language_steer_in_graph', {}).get('flip_rate')})",
                    flush=True,
                )
        results["seeds"][str(seed)] = row
    results["summary"] = summarize(results["seeds"])
    results["wall_time_s"] = round(time.time() - t0, 1)
    write_json(args.out, results)
    print(f"{args.out}  ({results['wall_time_s']} s)")
    for line in table_lines(results["summary"]):
        print(line)


def _setting(text: str, settings: type, option: str) -> tuple[str, object]:
    """``KEY=VALUE`` (a field of ``settings``; VALUE read as YAML)."""
    key, sep, value = text.partition("=")
    names = {f.name for f in dataclasses.fields(settings)} - {"threads"}
    if not sep or key not in names:
        raise SystemExit(f"{option} {text!r}: use KEY=VALUE with KEY one of {', '.join(sorted(names))}")
    return key, yaml.safe_load(value)


def _rate(row: dict, kind: str, what: str) -> float | None:
    if what == "intermediate_node":
        return row[kind]["intermediate_node_rate"]
    if what == "steer_answer_kept":
        return row[kind].get("steer_answer_kept_rate")
    group, _, baseline = what.partition(":")
    counts = row[kind]["by_group"].get(group)
    if counts is None:
        return None
    return counts["flip_rate"] if not baseline else counts["baselines"][baseline]["flip_rate"]


MEASURES = (
    "intermediate_node",
    "state_swap",
    "state_swap:random",
    "state_swap:same_state",
    "state_swap:wrong_position",
    "language_steer",
    "language_steer:random",
    "steer_answer_kept",
    "language_steer_in_graph",
    "language_steer_in_graph:random",
)


def summarize(seeds: dict) -> dict:
    """Per transcoder kind and measure: the value per seed, the mean and the worst (lowest for a
    rate that should be high, highest for a baseline that should stay low)."""
    out: dict = {}
    for kind in ("plt", "clt"):
        for what in MEASURES:
            vals = [_rate(row, kind, what) for row in seeds.values()]
            vals = [v for v in vals if v is not None]
            worst = (max if ":" in what else min)(vals) if vals else None
            out[f"{kind} {what}"] = {
                "per_seed": vals,
                "mean": round(sum(vals) / len(vals), 4) if vals else None,
                "worst": worst,
            }
    return out


def table_lines(summary: dict) -> list[str]:
    lines = ["| transcoders, measure | per seed | mean | worst |", "|---|---|---|---|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {', '.join(f'{v:.2f}' for v in s['per_seed'])} | {s['mean']} | {s['worst']} |")
    return lines


if __name__ == "__main__":
    main()
