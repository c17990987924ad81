"""The evaluation spec: bad specs are clear errors, and a spec round-trips through its dict."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.evaluation import evaluate
from pipeline.analysis.evaluation_spec import EvaluationSpec, Experiment
from tests.analysis.evaluation_fixtures import tiny_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir, plt_dir, tmp_path_factory):
    """A float64 model, a prompt, its attribution graph and a donor prompt."""
    return tiny_setup(tiny_gpt2_dir, plt_dir, tmp_path_factory.mktemp("eval") / "g.zarr")


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"experiments": [{"name": "x", "kind": "flip", "source": [[0, 1, 2]]}]}, "kind must be one of"),
        ({"experiments": [{"name": "x", "kind": "swap", "source": [[0, 1, 2]]}]}, "needs target features"),
        ({"experiments": [{"name": "x", "kind": "steer", "source": [[0, 1, 2]]}]}, "needs a value or a source_factor"),
        ({"experiments": [{"name": "x", "source": []}]}, "no source"),
        ({"experiments": [{"name": "x", "source": [[0, 1, 2]], "colour": 1}]}, "unknown keys \\['colour'\\]"),
        ({"experiments": [{"name": "x", "source": ["texas"]}]}, "unknown supernode 'texas'"),
        ({"experiments": [{"name": "x", "source": [[0, 1, 2]]}, {"name": "x", "source": [[0, 1, 2]]}]}, "unique"),
        ({"topk": 3}, "unknown keys \\['topk'\\]"),
        ({"errors": "live"}, "errors must be one of"),
    ],
)
def test_bad_specs_are_clear_errors(setup, spec, match):
    model, _, _, graph = setup
    with pytest.raises(ValueError, match=match):
        evaluate(model, graph, spec)


def test_spec_round_trips_and_experiment_defaults():
    spec = EvaluationSpec.from_dict({"top_k": 3, "experiments": [{"name": "a", "source": [[0, 1, 2]]}]})
    assert isinstance(spec.experiments[0], Experiment)
    assert EvaluationSpec.from_dict(spec.to_dict()) == spec
    assert spec.experiments[0].kind == "ablate" and spec.experiments[0].mode == "iterative"
    assert np.isfinite(spec.edge_threshold)
