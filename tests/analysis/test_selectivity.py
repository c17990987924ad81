"""Feature selectivity and selection rules against brute-force counts on a tiny model and a
hand-made labeled prompt bank: the table's selective features, its file, anchor positions, and
that a rule in an experiment picks exactly the features a brute-force selection would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis.evaluation import evaluate
from pipeline.analysis.evaluation_spec import PromptContext
from pipeline.analysis.experiments import NO_MATCH
from pipeline.analysis.selectivity import (
    SelectivityTable,
    anchor_position,
    compute_selectivity,
    labeled_prompt,
)
from pipeline.engine.attribution import attribute
from pipeline.engine.intervened_forward import clean_run
from pipeline.engine.replacement import ReplacementModel
from pipeline.graph.pruned import selected_feature_table
from pipeline.graph.pruning import prune_graph

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CITIES = {"dallas": "texas", "houston": "texas", "miami": "florida", "tampa": "florida", "portland": "oregon"}
HI, LO = 0.75, 0.25  # loose thresholds: random transcoders have few sharply selective features


def bank() -> list[dict]:
    """Two templates per city (English, the tiny vocabulary's "French"), city at different positions."""
    out = []
    for city, state in CITIES.items():
        for language, prompt in (
            ("en", f"the capital of the state containing {city} is"),
            ("fr", f"la capitale de {city} est"),
        ):
            out.append(
                {
                    "prompt": prompt,
                    "labels": {"state": state, "city": city, "language": language},
                    "anchors": {"city": city},
                }
            )
    return out


def city_pos(item: dict) -> int:
    """The city's token, by counting words (the tiny tokenizer is one token a word, BOS first)."""
    return item["prompt"].split().index(item["anchors"]["city"]) + 1


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir, plt_dir):
    return ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def table(model):
    return compute_selectivity(model, bank(), labels=("state", "language"), hi=HI, lo=LO)


def brute_force(model, role: str, label: str, value: str) -> np.ndarray:
    """Selective features for (label, value, role) counted from scratch, as the docs define them."""
    fired_in, fired_out, n_in, n_out = 0, 0, 0, 0
    for item in bank():
        acts = clean_run(model, item["prompt"]).activations.numpy()
        if role == "any":
            fired = (acts[:, 1:] > 0).any(axis=1)
        else:
            fired = acts[:, city_pos(item) if role == "city" else -1] > 0
        if item["labels"][label] == value:
            fired_in, n_in = fired_in + fired, n_in + 1
        else:
            fired_out, n_out = fired_out + fired, n_out + 1
    return (fired_in / n_in >= HI) & (fired_out / n_out <= LO)


@pytest.mark.parametrize("role", ["city", "last", "any"])
def test_selective_features_are_the_brute_force_ones(model, table, role):
    assert table.labels == {"state": ["florida", "oregon", "texas"], "language": ["en", "fr"]}
    found = 0
    for label, values in table.labels.items():
        for value in values:
            want = brute_force(model, role, label, value)
            assert np.array_equal(table.selective(label, value, role), want), (label, value)
            found += int(want.sum())
    assert found, f"the fixture has no selective feature at {role}: the test checks nothing"
    assert not table.selective("state", "nowhere", role).any()


def brute_force_contrast(model, role: str, value: str, other: str) -> np.ndarray:
    """Features firing on >= HI of ``value``'s prompts and <= LO of ``other``'s, from scratch."""
    counts = {value: 0, other: 0}
    n = {value: 0, other: 0}
    for item in bank():
        state = item["labels"]["state"]
        if state not in counts:
            continue
        acts = clean_run(model, item["prompt"]).activations.numpy()
        counts[state] = counts[state] + (acts[:, city_pos(item) if role == "city" else -1] > 0)
        n[state] += 1
    return (counts[value] / n[value] >= HI) & (counts[other] / n[other] <= LO)


def test_contrastive_features_are_the_brute_force_ones(model, table):
    role = "city"
    found = 0
    for value, other in (("texas", "florida"), ("florida", "texas"), ("texas", "oregon")):
        want = brute_force_contrast(model, role, value, other)
        assert np.array_equal(table.contrastive("state", value, other, role), want), (value, other)
        found += int(want.sum())
    assert found, "the fixture has no contrastive feature: the test checks nothing"
    # selective for a value implies contrastive against any other value
    sel = table.selective("state", "texas", role)
    assert not (sel & ~table.contrastive("state", "texas", "florida", role)).any()
    assert not table.contrastive("state", "texas", "texas", role).any()


def test_table_file_round_trips_with_deterministic_bytes(table, tmp_path):
    a = table.save(tmp_path / "a.npz").read_bytes()
    b = table.save(tmp_path / "b.npz").read_bytes()
    assert a == b
    loaded = SelectivityTable.load(tmp_path / "a.npz")
    assert (loaded.labels, loaded.roles, loaded.hi, loaded.lo) == (table.labels, table.roles, HI, LO)
    for key, counts in table.counts.items():
        assert np.array_equal(loaded.counts[key], counts) and np.array_equal(loaded.totals[key], table.totals[key])
    assert table.totals["city", "state"].tolist() == [4, 2, 4]  # florida, oregon, texas: 2 prompts a city


class _PieceTokenizer:
    """Decodes ids by concatenating word pieces, as a subword tokenizer does."""

    pieces = {0: "<bos>", 1: "the", 2: " Dal", 3: "las", 4: " is", 5: " Dallas", 6: "ville"}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_anchor_position_is_the_last_token_of_the_first_whole_word():
    tok = _PieceTokenizer()
    assert anchor_position(tok, torch.tensor([0, 1, 2, 3, 4]), "Dallas") == 3
    assert anchor_position(tok, torch.tensor([0, 1, 5, 6, 4, 5]), "Dallas") == 5  # "Dallasville" is not it
    assert anchor_position(tok, torch.tensor([0, 1, 4]), "Dallas") is None
    item = labeled_prompt("the Dallas is", ["state=Texas", "city=Dallas", "template=0"], "en")
    assert item == {
        "prompt": "the Dallas is",
        "labels": {"state": "Texas", "city": "Dallas", "template": "0", "language": "en"},
        "anchors": {"city": "Dallas"},
    }


@pytest.fixture(scope="module")
def graph(model, tmp_path_factory):
    return attribute(bank()[0]["prompt"], model, store=tmp_path_factory.mktemp("sel") / "g.zarr", verbose=False)


def _rule_spec(**rule) -> dict:
    return {
        "top_k": 0,
        "max_new_tokens": 0,
        "faithfulness": False,
        "baselines": [],
        "experiments": [{"name": "rule", "source": [{"select": "selective", **rule}], "expected_after": "austin"}],
    }


@pytest.mark.parametrize("in_graph", [False, True])
@pytest.mark.parametrize("role", ["city", "any"])
def test_a_rule_selects_exactly_the_brute_force_features(model, table, graph, role, in_graph):
    item = bank()[0]
    context = PromptContext(prompt=item, selectivity=table, bank=bank())
    spec = _rule_spec(label="language", role=role, in_graph=in_graph)
    selected = evaluate(model, graph, spec, context=context)["experiments"][0]["selected"]["source"]
    got = {(r["layer"], r["pos"], r["feature"]) for r in selected}

    acts = clean_run(model, item["prompt"]).activations.numpy()
    mask = brute_force(model, role, "language", "en")  # the prompt's own language
    pos = city_pos(item) if role == "city" else None
    if in_graph:
        feats, _ = selected_feature_table(graph)
        circuit = np.asarray(feats).reshape(-1, 3)[prune_graph(graph).node_mask[: len(feats)]]
        pairs = {(int(l), int(f)) for l, p, f in circuit if (p >= 1 if pos is None else p == pos)}
    else:
        active = (acts[:, 1:] > 0).any(axis=1) if pos is None else acts[:, pos] > 0
        pairs = {(int(l), int(f)) for l, f in zip(*np.nonzero(active))}
    want = {(l, pos, f) for l, f in pairs if mask[l, f]}
    assert got == want
    if not (in_graph and role == "city"):  # the fixture's circuit has none of them at the city
        assert want, "nothing selected: the test checks nothing"
    for r in selected:  # the recorded activation is the prompt's (the largest over it for role any)
        expected = acts[r["layer"], 1:, r["feature"]].max() if pos is None else acts[r["layer"], pos, r["feature"]]
        assert r["activation"] == pytest.approx(float(expected), rel=1e-5)
        assert r["rule"].startswith("selective language=en at " + role)


def test_a_rule_that_selects_nothing_is_reported_not_an_error(model, table, graph):
    context = PromptContext(prompt=bank()[0], selectivity=table, bank=bank())
    report = evaluate(model, graph, _rule_spec(label="state", value="nowhere", role="city"), context=context)
    e = report["experiments"][0]
    assert e["status"] == NO_MATCH and e["flipped"] is False and e["after"] is None
    assert report["summary"]["n_no_match"] == 1 and report["summary"]["n_checked"] == 1
    assert report["summary"]["flip_rate"] == 0.0


@pytest.mark.parametrize(
    "rule, context, match",
    [
        ({"label": "state", "role": "city"}, "no table", "needs a selectivity table"),
        ({"label": "colour", "role": "city"}, "bank", "no 'colour' label"),
        ({"label": "state", "role": "river"}, "bank", "no 'river' position"),
        ({"label": "state", "role": "city", "colour": 1}, "bank", "a selection rule is"),
        ({"label": "state", "role": "moon", "value": "texas"}, "bank", "no 'moon' position"),
    ],
)
def test_bad_rules_are_clear_errors(model, table, graph, rule, context, match):
    ctx = PromptContext(prompt=bank()[0], selectivity=None if context == "no table" else table)
    with pytest.raises(ValueError, match=match):
        evaluate(model, graph, _rule_spec(**rule), context=ctx)
