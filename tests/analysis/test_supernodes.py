"""Supernodes: read from the viewer's annotations or a config, and intervened on as one unit."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.analysis.supernodes import Supernode, intervene, load_supernodes, read_annotations
from pipeline.engine.intervened_forward import feature_intervention
from pipeline.engine.interventions import Scale
from pipeline.engine.replacement import ReplacementModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_supernodes_from_annotations_intervene_as_one_unit(tiny_gpt2_dir, clt_dir, tmp_path):
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, clt_dir, dtype=torch.float64)
    words = [w for w in model.tokenizer.get_vocab() if w.isalpha()]
    prompt = " ".join(sorted(words)[3:9])
    members = [[0, 2, 5], [1, 3, 9], [1, 4, 9]]
    simple = tmp_path / "simple.annotations.json"
    simple.write_text(json.dumps({"supernodes": {"texas": members}, "labels": {"0_5_2": "tx"}}))
    viewer = tmp_path / "viewer.annotations.json"
    viewer.write_text(
        json.dumps(
            {"schema_version": 1, "supernodes": {"texas": {"nodes": ["0_5_2", "1_9_3", "1_9_4"], "features": members}}}
        )
    )
    ann = read_annotations(simple)
    assert ann.labels == {"0_5_2": "tx"}
    assert ann.supernodes["texas"].features == tuple(tuple(m) for m in members)
    assert load_supernodes(viewer) == ann.supernodes
    assert load_supernodes({"texas": members}) == ann.supernodes
    ivs = intervene(ann.supernodes, "texas", Scale(-2.0))
    assert ivs == [(l, p, f, Scale(-2.0)) for l, p, f in members]
    a, _ = feature_intervention(model, prompt, ivs)
    b, _ = feature_intervention(model, prompt, [(l, p, f, Scale(-2.0)) for l, p, f in members])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    open_ivs = Supernode("t", ((0, 2, 5),)).interventions(0.0, open_ended=True)
    assert open_ivs == [(0, slice(2, None), 5, 0.0)]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: intervene({"a": Supernode("a", ((0, 1, 2),))}, "texas", 0.0), "unknown supernode 'texas'.*'a'"),
        (lambda: Supernode("x", ()), "has no features"),
        (lambda: Supernode("x", ((0, 1),)), "\\[layer, pos, feature\\]"),
        (lambda: load_supernodes({"x": {"nodes": ["0_1_2"]}}), "no 'features'"),
    ],
)
def test_bad_supernodes_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
