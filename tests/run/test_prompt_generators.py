"""Generated prompt sets: the organism's capitals set, and that conf/prompts/capitals.yaml is it."""

from __future__ import annotations

from pathlib import Path

from pipeline.organism.world import WorldConfig, make_world
from pipeline.run.prompt_generators import organism_capitals
from pipeline.run.prompt_sets import load_prompt_set, to_conf_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_capitals_set_is_twenty_organism_two_hop_prompts_and_matches_conf():
    world = make_world(WorldConfig())
    ps = organism_capitals(world, 20)
    assert len(ps) == 20 and len({r.tag("state") for r in ps}) == len(world.states)
    two_hop = {
        s.prompt: s.answer for s in world.sentences("two_hop", split="all", languages=("en",), canonical_only=True)
    }
    for r in ps:
        assert two_hop[r.prompt] == r.answer
        assert two_hop[r.contrast] == r.tag("contrast_answer") != r.answer
        assert (r.tag("heldout") == "true") == world.is_held_out(r.tag("city"))
    committed = load_prompt_set("capitals")
    assert [r.to_dict() for r in committed] == [r.to_dict() for r in ps]

    def body(text):
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert body(to_conf_yaml(ps)) == body((ROOT / "conf/prompts/capitals.yaml").read_text())
