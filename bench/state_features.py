"""Why a state has (or lacks) a state-selective feature at the city: per state, the selective
features, the nearest misses, and how well a linear read of MLP 0's input separates its cities.

    python bench/state_features.py                                   # the main job's organism
    python bench/state_features.py --organism bench/.work/organism_seeds/seed1 --kind clt

A feature is state-selective as the intervene stage's selection rules say
(``pipeline.analysis.selectivity``: at the city, on every canonical two-hop prompt of the world,
both languages, hi 0.9 / lo 0.05). The nearest misses are the layer-0 features with the largest
(share of the state's prompts it fires on) - (share of the others'). The margin: a linear
max-margin fit (hinge loss, light L2) of "this state's cities" against the rest on MLP 0's input
(``ln2.hook_normalized`` of block 0) at the city of the canonical English two-hop prompts,
centered; the smallest signed distance to the fitted plane (positive: every city on its side).
A transcoder feature reads that input linearly, so a state whose cities a plane separates only
narrowly would be hard for one feature to cover.

Who writes the state: at the city of the same prompts, each active layer-0 feature's write
(activation x decoder row into MLP 0's output) projected on the unit direction of the prompt's
state (the mean MLP 0 output over that state's cities minus the mean over all cities), summed
per kind of feature: selective for the prompt's state; a group feature (fires on at least half
of the prompts of 2 or more states, fewer than three quarters of them); generic (three quarters
of the states or more); one state's but not selective; city-level (no state's half). Writes
bench/results/state_features.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import load_organism_replacement, machine_info  # noqa: E402
from pipeline._io import write_json  # noqa: E402
from pipeline.analysis.selectivity import compute_selectivity  # noqa: E402


def separation_margin(x: torch.Tensor, inside: torch.Tensor, steps: int = 3000) -> float:
    """x (n, d), inside (n,) bool -> the smallest signed distance of a point to a fitted
    separating plane (positive: every point on its own side)."""
    sign = inside.float() * 2 - 1
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        loss = torch.relu(1 - sign * (x @ w + b)).mean() + 1e-4 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((sign * (x @ w + b)).min() / w.norm())


KINDS = ("selective", "group", "generic", "one state, not selective", "city-level")


def feature_kinds(table, states: list[str]) -> dict[str, np.ndarray]:
    """state -> (d_transcoder,) the kind (an index into KINDS) of each layer-0 feature at the city,
    seen from a prompt of that state."""
    half = np.stack([table.firing_fraction("state", st, "city")[0][0] >= 0.5 for st in states])  # (n, F)
    n_states = half.sum(0)
    shared = np.where(n_states >= 0.75 * len(states), 2, np.where(n_states >= 2, 1, np.where(n_states == 1, 3, 4)))
    return {st: np.where(table.selective("state", st, "city")[0], 0, shared) for st in states}


def state_writes(acts: torch.Tensor, decoder: torch.Tensor, outputs: torch.Tensor, states: list[str], kinds) -> dict:
    """Per kind of feature: active features per city and their write along the city's state direction.

    acts (n, F) layer-0 activations at the cities; decoder (F, d_model) rows into MLP 0's output;
    outputs (n, d_model) MLP 0's output there; states: the state of each city."""
    names = sorted(set(states))
    mean = outputs.mean(0)
    direction = {st: outputs[[s == st for s in states]].mean(0) - mean for st in names}
    totals = {k: [0.0, 0] for k in KINDS}
    for i, st in enumerate(states):
        f = torch.nonzero(acts[i] > 0)[:, 0]
        unit = direction[st] / direction[st].norm()
        writes = (acts[i, f, None] * decoder[f]) @ unit
        for kind, w in zip(kinds[st][f.numpy()], writes.tolist()):
            totals[KINDS[kind]][0] += w
            totals[KINDS[kind]][1] += 1
    n = len(states)
    return {
        k: {"active_per_city": round(c / n, 2), "state_write_per_city": round(w / n, 3)} for k, (w, c) in totals.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", type=Path, default=REPO / "models" / "organism")
    ap.add_argument("--kind", choices=("plt", "clt"), default="plt")
    ap.add_argument("--misses", type=int, default=3, help="nearest misses listed per state")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "state_features.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    world, model = load_organism_replacement(args.organism, args.kind, args.threads)

    # 1. the selectivity table and each state's features at the city
    table = compute_selectivity(model, world.labeled_prompts(), labels=("state",), roles=("city",))

    # 2. MLP 0's input at the city of every canonical English two-hop prompt
    inputs, acts, outputs, states = [], [], [], []
    for s in world.sentences("two_hop", split="all", canonical_only=True):
        if s.language == "en":
            words = s.text.split()
            capture = model.capture(" ".join(words[:-1]))
            at = 1 + words.index(s.city)
            inputs.append(capture.mlp_inputs[0, at].float())
            acts.append(capture.activations[0, at].float())
            outputs.append(capture.mlp_outputs[0, at].float())
            states.append(s.state)
    x = torch.stack(inputs)
    x = x - x.mean(0)
    n_features = acts[0].shape[0]
    decoder = model.transcoders.decoder_vectors(0, torch.arange(n_features))[:, 0].float()
    writes = state_writes(
        torch.stack(acts), decoder, torch.stack(outputs), states, feature_kinds(table, table.labels["state"])
    )

    rows = []
    for state in table.labels["state"]:
        inside, outside = (f[0] for f in table.firing_fraction("state", state, "city"))
        selective = np.nonzero((inside >= table.hi) & (outside <= table.lo))[0]
        order = np.argsort(-(inside - outside))
        misses = [int(f) for f in order[~np.isin(order, selective)][: args.misses]]
        rows.append(
            {
                "state": state,
                "selective": [int(f) for f in selective],
                "nearest_misses": [
                    {
                        "feature": f,
                        "fires_inside": round(float(inside[f]), 3),
                        "fires_outside": round(float(outside[f]), 3),
                    }
                    for f in misses
                ],
                "margin": round(separation_margin(x, torch.tensor([st == state for st in states])), 3),
            }
        )
        miss = "; ".join(
            f"#{m['feature']} {m['fires_inside']:.2f}/{m['fires_outside']:.3f}" for m in rows[-1]["nearest_misses"]
        )
        print(f"{state:13s} selective {rows[-1]['selective']!s:12s} margin {rows[-1]['margin']:.3f}  misses {miss}")
    total = sum(w["state_write_per_city"] for w in writes.values())
    print("who writes the state at the city (layer 0, per city):")
    for kind, w in writes.items():
        print(
            f"  {kind:26s} active {w['active_per_city']:5.2f}  write along the state {w['state_write_per_city']:6.2f}"
            f"  ({w['state_write_per_city'] / total:.0%})"
        )
    write_json(
        args.out,
        {
            "organism": str(args.organism),
            "kind": args.kind,
            "machine": machine_info(args.threads),
            "states": rows,
            "state_writes": writes,
        },
    )
    print(args.out)


if __name__ == "__main__":
    main()
