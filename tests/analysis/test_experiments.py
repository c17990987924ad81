"""Named experiments: that they do what they say, selectors, flips, selection rules and the
baselines beside an experiment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.evaluation import evaluate, study_metrics
from pipeline.analysis.evaluation_spec import PromptContext
from pipeline.analysis.experiments import is_flip, language_share
from pipeline.analysis.report import render_markdown
from pipeline.analysis.selection import Chosen, random_like
from pipeline.analysis.selectivity import compute_selectivity
from pipeline.engine.attribution import attribute
from pipeline.engine.generation import feature_intervention_generate
from pipeline.engine.intervened_forward import clean_run, feature_intervention
from pipeline.engine.interventions import Scale
from tests.analysis.evaluation_fixtures import spec_for, tiny_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """A float64 model, a prompt, its attribution graph and a donor prompt."""
    return tiny_setup(tiny_gpt2_dir, plt_dir, tmp_path_factory.mktemp("eval") / "g.zarr")


def test_experiments_do_what_they_say_and_flips_are_checked(setup):
    model, prompt, donor, graph = setup
    spec = spec_for(model, prompt, donor)
    cap, dcap = model.capture(prompt), model.capture(donor)
    n, nd = cap.n_pos, dcap.n_pos
    A = spec["supernodes"]["A"]
    B = spec["supernodes"]["B"]
    # the swap by hand: A x -1, B at end-aligned positions set to 4 x its donor activation
    manual = [(l, p, f, Scale(-1.0)) for l, p, f in A]
    manual += [(l, p + n - nd, f, 4.0 * float(dcap.activations[l, p, f])) for l, p, f in B]
    logits, _ = feature_intervention(model, prompt, manual)
    expected = model.tokenizer.decode([int(torch.argmax(logits[-1]))])
    clean_top = model.tokenizer.decode([int(torch.argmax(cap.logits[-1]))])
    spec["experiments"][1].update(expected_before=clean_top, expected_after=expected)
    spec["experiments"][0].update(expected_after="<surely not this>")
    report = evaluate(model, graph, spec)
    swap = report["experiments"][1]
    assert swap["after"][0]["token"] == expected and swap["flipped"] is True
    assert swap["n_interventions"] == 4 and swap["n_target_inactive_on_donor"] == 0
    assert report["experiments"][0]["flipped"] is False
    assert report["summary"]["n_checked"] == 2 and report["summary"]["flip_rate"] == 0.5
    assert study_metrics([report, report])["flip_rate"] == 0.5


def test_selectors_pick_active_features_and_not_on_donor_excludes_the_donors(setup):
    model, prompt, donor, graph = setup
    acts, dacts = clean_run(model, prompt).activations, clean_run(model, donor).activations
    n, nd = acts.shape[1], dacts.shape[1]
    spec = {
        "top_k": 0,
        "max_new_tokens": 0,
        "faithfulness": False,
        "experiments": [
            {"name": "all last", "source": [{"pos": -1}]},
            {"name": "layer 1 at 2", "source": [{"pos": 2, "layers": [1]}]},
            {"name": "specific", "source": [{"pos": -1, "not_on_donor": True}], "donor_prompt": donor},
            {
                "name": "swap",
                "kind": "swap",
                "source": [{"pos": -1, "layers": [0]}],
                "target": [{"pos": -1, "layers": [0]}],
                "donor_prompt": donor,
            },
        ],
    }
    report = evaluate(model, graph, spec)
    e = {x["name"]: x for x in report["experiments"]}
    assert e["all last"]["n_source_features"] == int((acts[:, -1] != 0).sum())
    assert e["layer 1 at 2"]["n_source_features"] == int((acts[1, 2] != 0).sum())
    specific = int(((acts[:, -1] != 0) & (dacts[:, nd - 1] == 0)).sum())
    assert e["specific"]["n_source_features"] == specific
    assert e["swap"]["n_interventions"] == int((acts[0, -1] != 0).sum() + (dacts[0, -1] != 0).sum())
    assert report["faithfulness"] is None and "Not run" in render_markdown(report)
    with pytest.raises(ValueError, match="not a position"):
        evaluate(
            model, graph, {"top_k": 0, "max_new_tokens": 0, "experiments": [{"name": "x", "source": [{"pos": n}]}]}
        )
    with pytest.raises(ValueError, match="needs a donor_prompt"):
        evaluate(
            model,
            graph,
            {
                "top_k": 0,
                "max_new_tokens": 0,
                "experiments": [{"name": "x", "source": [{"pos": -1, "not_on_donor": True}]}],
            },
        )


# ------------------------------------------------------------------------------------ flips
@pytest.mark.parametrize(
    "before, after, expected_before, expected_after, flipped",
    [
        ("Austin", "Sacramento", "Austin", "Sacramento", True),
        (" Austin", "Sacramento ", None, "Sacramento", True),  # whitespace aside
        ("Austin", "Austin", None, "Austin", False),  # a no-op is never a flip
        ("Austin", "Austin", "Austin", "Austin", False),
        ("Easton", "Sacramento", "Austin", "Sacramento", False),  # the clean answer was not the expected one
        ("Austin", "Houston", "Austin", "Sacramento", False),
        ("Austin", "Sacramento", "Austin", None, None),  # nothing to check
    ],
)
def test_a_flip_needs_the_top_token_to_change_to_the_expected_one(
    before, after, expected_before, expected_after, flipped
):
    assert is_flip(before, after, expected_before, expected_after) is flipped


def test_a_no_op_whose_expected_answer_is_the_clean_one_is_not_a_flip(setup):
    model, prompt, donor, graph = setup
    clean = clean_run(model, prompt)
    top = model.tokenizer.decode([int(torch.argmax(clean.logits[-1]))]).strip()
    off = int(torch.nonzero(clean.activations[0, -1] == 0)[0])  # inactive: ablating it changes nothing
    spec = {
        "top_k": 0,
        "max_new_tokens": 0,
        "faithfulness": False,
        "baselines": [],
        "experiments": [
            {"name": "no-op", "source": [[0, clean.n_pos - 1, off]], "expected_after": top},
            {"name": "no-op, before given", "source": [[0, -1, off]], "expected_before": top, "expected_after": top},
        ],
    }
    report = evaluate(model, graph, spec)
    for e in report["experiments"]:
        assert e["after"][0]["token"].strip() == top and e["kl_from_clean"] == 0
        assert e["after_ok"] is True and e["flipped"] is False
    assert report["summary"]["n_checked"] == 2 and report["summary"]["flip_rate"] == 0.0


# ------------------------------------------------------------------------------------ rules, baselines
CITIES = {"dallas": "texas", "houston": "texas", "miami": "florida", "tampa": "florida"}
WORDS = {"the": "en", "capital": "en", "of": "en", "is": "en", "la": "fr", "capitale": "fr", "de": "fr", "est": "fr"}


def labeled_bank() -> list[dict]:
    out = []
    for city, state in CITIES.items():
        for language, text in (
            ("en", f"the capital of the state containing {city} is"),
            ("fr", f"la capitale de {city} est"),
        ):
            labels = {"state": state, "city": city, "language": language}
            out.append({"prompt": text, "labels": labels, "anchors": {"city": city}})
    return out


@pytest.fixture(scope="module")
def swap_setup(setup, tmp_path_factory):
    """The English Dallas prompt, its graph, a loose selectivity table and a swap spec whose
    donor (the French Miami prompt) has its city elsewhere (position 4, here 7)."""
    model = setup[0]
    bank = labeled_bank()
    item = bank[0]
    graph = attribute(item["prompt"], model, store=tmp_path_factory.mktemp("swap") / "g.zarr", verbose=False)
    table = compute_selectivity(model, bank, hi=0.75, lo=0.25)
    spec = {
        "top_k": 0,
        "max_new_tokens": 3,
        "faithfulness": False,
        "n_random": 6,
        "experiments": [
            {
                "name": "state swap",
                "kind": "swap",
                "source": [{"select": "selective", "label": "state", "role": "city"}],
                "source_factor": -4,
                "target": [{"select": "selective", "label": "state", "role": "city"}],
                "target_factor": 10,
                "donor_prompt": "la capitale de miami est",
                "constrained_layers": [0],
                "expected_after": "miami",
            }
        ],
    }
    context = PromptContext(prompt=item, selectivity=table, bank=bank, word_languages=WORDS)
    return model, graph, spec, context


def test_a_rule_swap_writes_the_donors_features_at_this_prompts_city(swap_setup):
    model, graph, spec, context = swap_setup
    report = evaluate(model, graph, spec, context=context)
    e = report["experiments"][0]
    src, tgt = e["selected"]["source"], e["selected"]["target"]
    assert src and tgt and e["status"] == "ran" and e["mode"] == "constrained"
    assert {r["pos"] for r in src} == {r["at"] for r in src} == {7} and {r["token"] for r in src} == {"dallas"}
    assert {r["pos"] for r in tgt} == {4} and {r["at"] for r in tgt} == {7}  # city to city, not end-aligned
    assert all(r["rule"] == "selective state=texas at city" for r in src)
    assert all(r["rule"] == "selective state=florida at city" for r in tgt)
    donor = clean_run(model, "la capitale de miami est").activations
    manual = [(r["layer"], 7, r["feature"], Scale(-4.0)) for r in src]
    manual += [(r["layer"], 7, r["feature"], 10 * float(donor[r["layer"], 4, r["feature"]])) for r in tgt]
    logits, _ = feature_intervention(model, graph.attrs["prompt"], manual, constrained_layers=[0])
    probs = torch.softmax(logits[-1].double(), -1)
    assert e["after"][0]["id"] == int(torch.argmax(probs))
    assert e["after"][0]["prob"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_a_contrast_swap_selects_what_tells_the_two_states_apart(swap_setup):
    """source: Texas features Florida lacks, active at Dallas; target: Florida features Texas
    lacks, active at the donor's Miami (the table's contrastive masks, checked by hand)."""
    model, graph, spec, context = swap_setup
    exp = dict(spec["experiments"][0], name="contrast swap")
    exp["source"] = [{"select": "contrast", "label": "state", "role": "city"}]
    exp["target"] = [{"select": "contrast", "label": "state", "role": "city"}]
    e = evaluate(model, graph, dict(spec, experiments=[exp]), context=context)["experiments"][0]
    table = context.selectivity
    here = clean_run(model, graph.attrs["prompt"]).activations[:, 7]
    donor = clean_run(model, "la capitale de miami est").activations[:, 4]
    want_src = {
        (int(l), int(f))
        for l, f in zip(*np.nonzero(table.contrastive("state", "texas", "florida", "city") & (here > 0).numpy()))
    }
    want_tgt = {
        (int(l), int(f))
        for l, f in zip(*np.nonzero(table.contrastive("state", "florida", "texas", "city") & (donor > 0).numpy()))
    }
    assert want_src or want_tgt, "the fixture has no contrastive feature: the test checks nothing"
    assert {(r["layer"], r["feature"]) for r in e["selected"]["source"]} == want_src
    assert {(r["layer"], r["feature"]) for r in e["selected"]["target"]} == want_tgt
    assert all(r["rule"] == "contrast state=texas (not florida) at city" for r in e["selected"]["source"])


def test_baselines_beside_a_swap(swap_setup):
    model, graph, spec, context = swap_setup
    report = evaluate(model, graph, spec, context=context)
    e = report["experiments"][0]
    b = e["baselines"]
    assert set(b) == {"random", "same_state", "wrong_position"}
    # random: n_random draws of the selected sets' size, reproducible
    size = {"source": len(e["selected"]["source"]), "target": len(e["selected"]["target"])}
    assert b["random"]["n_runs"] == 6 and b["random"]["size"] == size
    assert evaluate(model, graph, spec, context=context)["experiments"][0]["baselines"] == b
    # same-state donors: the other Texas city in the donor's language (French), never this prompt
    assert [d["prompt"] for d in b["same_state"]["donors"]] == ["la capitale de houston est"]
    assert (b["same_state"]["label"], b["same_state"]["value"], b["same_state"]["n_runs"]) == ("state", "texas", 1)
    # wrong position: the same interventions one token earlier, at "containing"
    assert b["wrong_position"]["moves"] == [{"from": 7, "to": 6, "token": "containing"}]
    donor = clean_run(model, "la capitale de miami est").activations
    moved = [(r["layer"], 6, r["feature"], Scale(-4.0)) for r in e["selected"]["source"]]
    moved += [
        (r["layer"], 6, r["feature"], 10 * float(donor[r["layer"], 4, r["feature"]])) for r in e["selected"]["target"]
    ]
    logits, _ = feature_intervention(model, graph.attrs["prompt"], moved, constrained_layers=[0])
    assert b["wrong_position"]["top_token"] == model.tokenizer.decode([int(torch.argmax(logits[-1]))])
    # summed in the summary, per kind
    s = report["summary"]
    assert s["baselines"]["random"] == {
        "n_experiments": 1,
        "n_runs": 6,
        "n_flipped": b["random"]["n_flipped"],
        "flip_rate": b["random"]["flip_rate"],
    }
    assert s["by_kind"]["swap"]["baselines"] == s["baselines"]
    md = render_markdown(report)
    assert "Flip rates and their baselines" in md and "same-state donors" in md and "houston" in md


def test_a_contrast_swaps_same_state_donor_gives_its_features_against_the_counterfactual(swap_setup):
    """Houston shares Dallas's state: contrasted with Dallas it would give no feature at all,
    and the baseline would only ablate. It gives the Texas features Florida (the swap's
    counterfactual) lacks, written at Dallas; kept counts runs that still answer as before."""
    model, graph, spec, context = swap_setup
    exp = dict(spec["experiments"][0], name="contrast swap", expected_before="dallas")
    exp["source"] = [{"select": "contrast", "label": "state", "role": "city"}]
    exp["target"] = [{"select": "contrast", "label": "state", "role": "city"}]
    e = evaluate(model, graph, dict(spec, experiments=[exp]), context=context)["experiments"][0]
    (donor,) = e["baselines"]["same_state"]["donors"]
    houston = clean_run(model, "la capitale de houston est").activations[:, 4]
    want = context.selectivity.contrastive("state", "texas", "florida", "city") & (houston > 0).numpy()
    assert want.any(), "the fixture has no Texas-not-Florida feature at Houston: the test checks nothing"
    assert donor["n_target_features"] == int(want.sum())
    src = [(r["layer"], 7, r["feature"], Scale(-4.0)) for r in e["selected"]["source"]]
    tgt = [(int(l), 7, int(f), 10 * float(houston[l, f])) for l, f in zip(*np.nonzero(want))]
    logits, _ = feature_intervention(model, graph.attrs["prompt"], src + tgt, constrained_layers=[0])
    top = model.tokenizer.decode([int(torch.argmax(logits[-1]))])
    assert donor["top_token"] == top
    assert donor["kept"] == (top.strip() == "dallas")
    assert e["baselines"]["same_state"]["n_kept"] == int(donor["kept"])


def test_random_draws_are_reproducible_of_the_right_shape_and_active(setup):
    model, prompt, _, _ = setup
    acts = clean_run(model, prompt).activations
    n = acts.shape[1]
    active_last = torch.nonzero(acts[0, n - 1]).reshape(-1).tolist()
    anywhere = torch.nonzero((acts[1, 1:] > 0).any(0)).reshape(-1).tolist()
    chosen = [Chosen(0, n - 1, f, 1.0, "x", at=n - 1) for f in active_last[:2]]
    chosen += [Chosen(1, None, f, 1.0, "x", at=None) for f in anywhere[:3]]
    draws = [random_like(chosen, acts, np.random.default_rng([0, 7])) for _ in range(2)]
    assert draws[0] == draws[1]
    other = [random_like(chosen, acts, np.random.default_rng([s, 7])) for s in range(1, 30)]
    assert any(d != draws[0] for d in other)
    for d in [draws[0], *other]:
        assert sum(c.pos == n - 1 for c in d) == 2 and sum(c.pos is None for c in d) == 3
        assert len({(c.layer, c.pos, c.feature) for c in d}) == 5  # without replacement
        for c in d:
            assert c.rule == "random"
            if c.pos is None:
                assert c.at is None and c.feature in anywhere
                assert c.activation == pytest.approx(float(acts[1, 1:, c.feature].max()))
            else:
                assert c.at == n - 1 and c.feature in active_last
                assert c.activation == pytest.approx(float(acts[0, n - 1, c.feature]))


def test_an_open_ended_steer_is_measured_by_the_language_of_its_continuation(swap_setup):
    model, graph, _, context = swap_setup
    rule = {"select": "selective", "label": "language", "value": "fr", "role": "any"}
    spec = {
        "top_k": 0,
        "max_new_tokens": 4,
        "faithfulness": False,
        "n_random": 3,
        "experiments": [
            {
                "name": "steer",
                "kind": "steer",
                "source": [rule],
                "source_factor": -2.0,
                "open_ended": True,
                "expected_language": "en",
            }
        ],
    }
    e = evaluate(model, graph, spec, context=context)["experiments"][0]
    assert e["selected"]["source"] and all(r["pos"] is None and r["at"] is None for r in e["selected"]["source"])
    ivs = [(r["layer"], slice(1, None), r["feature"], Scale(-2.0)) for r in e["selected"]["source"]]
    prompt = graph.attrs["prompt"]
    for name, interventions in (("clean", []), ("steered", ivs)):
        out = feature_intervention_generate(model, prompt, interventions, max_new_tokens=4)
        assert e["generation"][name] == out.completion
        words = [model.tokenizer.decode([t]) for t in out.tokens[out.n_prompt :].tolist()]
        share = language_share(words, WORDS, "en")
        assert e["language"][f"{name}_share"] == (None if share is None else pytest.approx(share, rel=1e-5))
    shares = [e["language"]["clean_share"], e["language"]["steered_share"]]
    was, now = (x is not None and x > 0.5 for x in shares)
    assert e["flipped"] is (now and not was)
    assert set(e["baselines"]) == {"random", "wrong_position"} and e["baselines"]["random"]["n_runs"] == 3
    assert e["baselines"]["wrong_position"]["n_runs"] == 0  # every position but BOS: no wrong one
    assert language_share(["the", "dallas", "la", "de"], WORDS, "en") == 1 / 3
    assert language_share(["dallas"], WORDS, "en") is None
