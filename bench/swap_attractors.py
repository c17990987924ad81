"""Where the state swap's random flips come from: one donor feature x10 at the city, on every
other state's two-hop prompts, per donor state.

    python bench/swap_attractors.py                  # the main job's organism (after dvc repro)
    python bench/swap_attractors.py --kind clt --cities 2

For every state, the first of its cities is the donor. Each layer-0 feature active at the
donor's city is set to 10x its activation there (the swap's target recipe: constrained to layer
0, circuit-tracer's intervention semantics), alone, at the city of the other states' English
two-hop prompts. A feature is state-selective as the intervene stage's selection rules say
(``pipeline.analysis.selectivity``: at the city, on every canonical two-hop prompt of the world,
both languages, hi 0.9 / lo 0.05); the random baseline draws from the other ones. Per feature: the share of prompts whose answer
becomes the donor's capital (a transplant) and the share that goes to the most frequent other
answer (an attractor, the same whoever the donor is), and both again in direct-effects mode
(norm scales and every MLP frozen: the model made linear), which tells an attractor its decoder
writes from one the live model makes of a swamped residual. Writes bench/results/swap_attractors.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import load_organism_replacement, machine_info  # noqa: E402
from pipeline._io import write_json  # noqa: E402
from pipeline.analysis.selectivity import compute_selectivity  # noqa: E402

FACTOR = 10.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", type=Path, default=REPO / "models" / "organism")
    ap.add_argument("--kind", choices=("plt", "clt"), default="plt")
    ap.add_argument("--cities", type=int, default=3, help="two-hop prompts per state")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "swap_attractors.json")
    args = ap.parse_args(argv)
    world, model = load_organism_replacement(args.organism, args.kind, args.threads)

    # 1. the prompts: per state, its first cities' English two-hop prompts; the city's position
    prompts: dict[str, list[tuple[str, str, int]]] = {}
    for s in world.sentences("two_hop", split="all", canonical_only=True):
        if s.language == "en" and len(prompts.setdefault(s.state, [])) < args.cities:
            words = s.text.split()
            prompts[s.state].append((" ".join(words[:-1]), words[-1], 1 + words.index(s.city)))
    states = sorted(prompts)

    # 2. the state-selective features at the city, as the selection rules define them
    table = compute_selectivity(model, world.labeled_prompts(), labels=("state",), roles=("city",))

    # 3. clean runs: the answer and the layer-0 features active at the city
    active: dict[tuple[str, int], set[int]] = {}
    acts_at: dict[str, torch.Tensor] = {}
    for st in states:
        for i, (p, ans, city) in enumerate(prompts[st]):
            logits, acts = model.feature_intervention(p, [])
            if model.tokenizer.decode([int(logits[-1].argmax())]).strip() != ans:
                raise SystemExit(f"the organism answers {p!r} wrongly: rebuild it (dvc repro)")
            active[(st, i)] = set(torch.nonzero(acts[0, city] > 0).flatten().tolist())
            if i == 0:
                acts_at[st] = acts[0, city]

    # the geometry the transcoders reconstruct: MLP 0's output at the city of every canonical
    # English two-hop prompt, split into the mean over all cities (generic), each state's offset
    # from it, and each city's offset from its state's mean
    outs, labels = [], []
    for s in world.sentences("two_hop", split="all", canonical_only=True):
        if s.language == "en":
            words = s.text.split()
            outs.append(model.capture(" ".join(words[:-1])).mlp_outputs[0, 1 + words.index(s.city)])
            labels.append(states.index(s.state))
    Y, label = torch.stack(outs), torch.as_tensor(labels)
    generic = Y.mean(0)
    means = torch.stack([Y[label == i].mean(0) for i in range(len(states))])
    offsets = torch.nn.functional.normalize(means - generic, dim=1)
    cosines = offsets @ offsets.T
    off_diagonal = cosines[~torch.eye(len(states), dtype=torch.bool)]
    geometry = {
        "n_cities": len(Y),
        "generic_norm": round(float(generic.norm()), 2),
        "mean_state_offset_norm": round(float((means - generic).norm(dim=1).mean()), 2),
        "mean_city_offset_norm": round(float((Y - means[label]).norm(dim=1).mean()), 2),
        "state_offset_cosine_mean": round(float(off_diagonal.mean()), 3),
        "state_offset_cosine_max": round(float(off_diagonal.max()), 3),
    }

    def decoder_cosines(f: int) -> dict:
        """cos(f's layer-0 decoder, the generic city direction) and its largest with a state's offset."""
        d = model.transcoders.decoder_vectors(0, torch.tensor([f]))[0].reshape(-1, model.d_model)[0].float()
        to_states = offsets @ (d / d.norm())
        return {
            "decoder_cos_generic": round(float(d @ generic / (d.norm() * generic.norm())), 2),
            "decoder_best_state": states[int(to_states.argmax())],
            "decoder_cos_best_state": round(float(to_states.max()), 2),
        }

    def fires_on(f: int, st: str) -> float:
        return sum(f in active[(st, i)] for i in range(len(prompts[st]))) / len(prompts[st])

    # 4. each donor feature x10 alone, on every other state's prompts
    rows = []
    for donor in states:
        donor_answer = prompts[donor][0][1]
        selective_here = table.selective("state", donor, "city")[0]  # layer 0
        for f in sorted(active[(donor, 0)]):
            others = [fires_on(f, st) for st in states if st != donor]
            selective = bool(selective_here[f])
            value = FACTOR * float(acts_at[donor][f])
            answers: Counter = Counter()
            direct: Counter = Counter()  # the same change in direct-effects mode: the model linear
            for st in states:
                if st == donor:
                    continue
                for p, ans, city in prompts[st]:
                    for counts, how in ((answers, {"constrained_layers": [0]}), (direct, {"direct_effects": True})):
                        logits, _ = model.feature_intervention(p, [(0, city, f, value)], **how)
                        top = model.tokenizer.decode([int(logits[-1].argmax())]).strip()
                        counts["kept" if top == ans else top] += 1
            n = sum(answers.values())
            moved = {k: v for k, v in answers.items() if k != "kept"}
            attractor = max((k for k in moved if k != donor_answer), key=lambda k: moved[k], default=None)
            fires = [float(acts_at[st][f]) for st in states]
            rows.append(
                {
                    "donor": donor,
                    "feature": f,
                    "state_selective": selective,
                    "fires_on_other_states": round(sum(o > 0 for o in others) / len(others), 3),
                    "activation_at_first_cities": [round(min(fires), 2), round(max(fires), 2)],
                    "to_donor_capital": round(answers[donor_answer] / n, 3),
                    "attractor": attractor,
                    "to_attractor": round(moved[attractor] / n, 3) if attractor else 0.0,
                    "kept": round(answers["kept"] / n, 3),
                    "direct": {
                        "to_donor_capital": round(direct[donor_answer] / n, 3),
                        "to_attractor": round(direct[attractor] / n, 3) if attractor else 0.0,
                        "kept": round(direct["kept"] / n, 3),
                    },
                }
            )
        print(f"{donor}: {len(active[(donor, 0)])} features", flush=True)

    # 5. summary: the random pool's features (not state-selective) against the selective ones
    summary = {}
    for name, sel in (("state_selective", True), ("other", False)):
        rs = [r for r in rows if r["state_selective"] == sel]
        if rs:
            summary[name] = {
                "n_features": len(rs),
                "mean_to_donor_capital": round(sum(r["to_donor_capital"] for r in rs) / len(rs), 3),
                "mean_to_attractor": round(sum(r["to_attractor"] for r in rs) / len(rs), 3),
                "direct_mean_to_donor_capital": round(sum(r["direct"]["to_donor_capital"] for r in rs) / len(rs), 3),
                "direct_mean_to_attractor": round(sum(r["direct"]["to_attractor"] for r in rs) / len(rs), 3),
            }
    by_attractor: Counter = Counter()
    for r in rows:
        if not r["state_selective"] and r["to_attractor"] >= 0.2:
            by_attractor[(r["feature"], r["attractor"])] += 1

    def attractor_row(f: int, a: str, k: int) -> dict:
        rs = [r for r in rows if r["feature"] == f and r["attractor"] == a]
        lo, hi = rs[0]["activation_at_first_cities"]
        return {
            "feature": f,
            "attractor": a,
            "n_donors": k,
            "fires_at_first_cities": sum(float(acts_at[st][f]) > 0 for st in states),
            "activation_at_first_cities": [lo, hi],
            # how much of the pull survives with the model made linear (norms and later MLPs frozen)
            "mean_to_attractor": round(sum(r["to_attractor"] for r in rs) / len(rs), 3),
            "mean_to_attractor_direct": round(sum(r["direct"]["to_attractor"] for r in rs) / len(rs), 3),
            **decoder_cosines(f),
        }

    summary["attractors_across_donors"] = [attractor_row(f, a, k) for (f, a), k in by_attractor.most_common(10)]
    summary["geometry"] = geometry
    summary["state_selective_decoders"] = [
        {"feature": f, **decoder_cosines(f)} for f in sorted({r["feature"] for r in rows if r["state_selective"]})
    ]
    result = {"kind": args.kind, "machine": machine_info(args.threads), "summary": summary, "rows": rows}
    write_json(args.out, result)
    print(args.out)
    for name in ("state_selective", "other"):
        if name in summary:
            s = summary[name]
            print(
                f"{name}: {s['n_features']} donor features; to the donor's capital {s['mean_to_donor_capital']:.3f}, "
                f"to the most frequent other answer {s['mean_to_attractor']:.3f} (direct effects: "
                f"{s['direct_mean_to_donor_capital']:.3f}, {s['direct_mean_to_attractor']:.3f})"
            )
    for a in summary["attractors_across_donors"]:
        print(
            f"  feature {a['feature']} -> {a['attractor']} (>= 20 % of prompts) from {a['n_donors']} donor states; "
            f"fires at {a['fires_at_first_cities']} of {len(states)} first cities; to it {a['mean_to_attractor']:.2f} "
            f"(direct effects {a['mean_to_attractor_direct']:.2f}); decoder cos generic {a['decoder_cos_generic']:+.2f}, "
            f"{a['decoder_best_state']} {a['decoder_cos_best_state']:+.2f}"
        )
    print("MLP 0 at the city:", geometry)
    sel = summary["state_selective_decoders"]
    print(
        "state-selective decoders: cos generic "
        f"{min(d['decoder_cos_generic'] for d in sel):+.2f}..{max(d['decoder_cos_generic'] for d in sel):+.2f}, "
        f"best state {min(d['decoder_cos_best_state'] for d in sel):+.2f}..{max(d['decoder_cos_best_state'] for d in sel):+.2f}"
    )


if __name__ == "__main__":
    main()
