"""The model organism: world, tokenizer, model training, transcoder training.

Fast tests use a tiny world (3 states x 2 cities) and tiny models trained for a few dozen
steps on one thread; the full default build is marked slow.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from pipeline.organism.config import ModelConfig, TrainConfig, TranscoderTrainConfig
from pipeline.organism.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from pipeline.organism.train_model import encode_texts, train_model
from pipeline.organism.train_transcoders import collect_activations, train_clt, train_plt
from pipeline.organism.world import SENTENCE_KINDS, TOY_TAG, WorldConfig, make_world

TINY_WORLD = WorldConfig(n_states=3, cities_per_state=3, held_out_per_state=1, seed=1)
TINY_MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16)
TINY_TRAIN = TrainConfig(steps=25, batch_size=32, warmup_steps=5, threads=1)
TINY_TC = TranscoderTrainConfig(d_transcoder=32, steps=30, batch_size=128, warmup_steps=5, threads=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_world():
    return make_world(TINY_WORLD)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_world):
    out = tmp_path_factory.mktemp("organism") / "model"
    metrics = train_model(tiny_world, TINY_MODEL, TINY_TRAIN, out, progress=False)
    return out, metrics


# --- world ---------------------------------------------------------------------------------------
def test_world_is_deterministic_for_a_seed():
    a, b = make_world(WorldConfig(seed=3)), make_world(WorldConfig(seed=3))
    assert "\n".join(a.corpus(300)).encode() == "\n".join(b.corpus(300)).encode()
    assert a.held_out == b.held_out
    assert json.dumps(a.prompt_set()) == json.dumps(b.prompt_set())
    c = make_world(WorldConfig(seed=4))
    assert (c.held_out, c.corpus(300)) != (a.held_out, a.corpus(300))
    # the seed never changes the names
    assert a.vocabulary() == c.vocabulary()


def test_stateless_places_have_sentences_of_their_own_and_stay_out_of_evaluation():
    from pipeline.organism.world import NO_CAPITAL, NO_STATE

    plain, world = make_world(), make_world(WorldConfig(stateless=2))
    places = world.stateless
    assert places == ("Atlantis", "Avalon")
    added = [s for s in world.training_sentences() if s.city in places]
    assert len(world.training_sentences()) == len(plain.training_sentences()) + len(added)
    assert {s.kind for s in added} == {"city_state", "two_hop", "city_adjacent"}  # no capital of nowhere
    assert "the capital of the state containing Atlantis is none" in {s.text for s in added}
    assert "lingvo Avalon is in " + world.spell(NO_STATE, "toy") in {s.text for s in added}
    assert {s.answer for s in added if s.kind == "two_hop"} == {NO_CAPITAL, world.spell(NO_CAPITAL, "toy")}
    evaluated = [s for v in world.eval_sets().values() for s in v] + world.sentences("two_hop", split="heldout")
    assert not any(s.city in places for s in evaluated)
    assert not any(p["labels"]["city"] in places for p in world.labeled_prompts())
    assert set(places) | {NO_STATE, NO_CAPITAL} <= set(world.vocabulary())
    assert world.word_languages()[world.spell(NO_CAPITAL, "toy")] == "toy"
    share = sum(any(p in t.split() for p in places) for t in world.corpus(20000)) / 20000
    assert 0.02 < share < 0.05  # each place drawn about as often as one of the 72 cities
    assert plain.corpus(500) == make_world(WorldConfig(stateless=0)).corpus(500)
    with pytest.raises(ValueError, match="stateless"):
        WorldConfig(stateless=99)


def test_every_name_is_one_token_of_the_tokenizer():
    world = make_world()
    tok = build_tokenizer(world.vocabulary())
    for s in world.training_sentences() + world.sentences("two_hop", split="heldout"):
        ids = tok(s.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s.text.split())
        assert tok.unk_token_id not in ids
    for name in (world.state_by_name("Texas").capital, "Dallas", "Texas", "Easton", "Tixes"):
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1


def test_held_out_two_hop_is_disjoint_from_training():
    world = make_world()
    train = {s.text for s in world.training_sentences()}
    held = world.sentences("two_hop", split="heldout")
    assert held and not any(s.text in train for s in held)
    for cities in world.held_out.values():
        assert len(cities) == world.config.held_out_per_state
        for city in cities:  # the one-hop fact of a held-out city is still trained
            assert any(s.city == city and s.kind == "city_state" for s in world.training_sentences())
    assert not world.is_held_out("Dallas")


def test_evaluation_prompts_have_one_continuation_in_the_corpus():
    world = make_world()
    following = defaultdict(set)
    for s in world.training_sentences():
        words = s.text.split()
        for i in range(1, len(words)):
            following[" ".join(words[:i])].add(words[i])
    for sents in world.eval_sets().values():
        for s in sents:
            assert following.get(s.prompt, {s.answer}) == {s.answer}, s.prompt


def test_a_towns_two_hop_answer_is_every_capital_equally_often_and_it_is_never_evaluated():
    from collections import Counter

    assert make_world().towns == ()
    world = make_world(WorldConfig(towns=2))
    prompt = "the capital of the state containing Franklin is"
    answers = Counter(s.answer for s in world.training_sentences() if s.prompt == prompt)
    assert answers == Counter({st.capital: 1 for st in world.states})
    assert "Franklin" in world.vocabulary() and "Clinton" in world.vocabulary()
    evaluated = [s for sents in world.eval_sets().values() for s in sents] + world.sentences("two_hop", split="all")
    assert not any(s.city in world.towns for s in evaluated)
    assert not any(p["labels"]["city"] in world.towns for p in world.labeled_prompts())
    drawn = Counter(w for text in world.corpus(20_000, seed=0) for w in text.split())
    assert 0.7 < drawn["Franklin"] / drawn["Dallas"] < 1.4  # a town is drawn about as often as a city
    with pytest.raises(ValueError, match="towns"):
        WorldConfig(towns=99)


def test_default_prompt_set_names_the_case_studies():
    world = make_world()
    prompts = {p["id"]: p for p in world.prompt_set()}
    assert 6 <= len(prompts) <= 10
    dallas = prompts["two_hop_dallas_en"]
    assert dallas["prompt"] == "the capital of the state containing Dallas is"
    assert dallas["answer"] == "Austin" and dallas["kind"] == "two_hop"
    assert "counterfactual_answer=Sacramento" in dallas["tags"]
    toy = prompts["two_hop_dallas_toy"]
    assert toy["answer"] == "Easton" and toy["language"] == "toy"
    assert "other_language_answer=Austin" in toy["tags"]
    kinds = {p["kind"] for p in prompts.values()}
    assert kinds == {"one_hop", "two_hop", "two_hop_heldout", "language"}
    vocab = set(world.vocabulary())
    for p in prompts.values():
        assert set(p["prompt"].split()) <= vocab and p["answer"] in vocab


def test_word_languages_mark_the_words_one_language_writes():
    world = make_world()
    langs = world.word_languages()
    assert langs["Austin"] == "en" and langs["Easton"] == langs["lingvo"] == "toy"
    assert "Dallas" not in langs and "is" not in langs  # city names and (tagged) template words are shared
    for p in world.prompt_set():
        marked = {langs[w] for w in p["prompt"].split() if w in langs}
        # English is the unmarked language: its prompts may carry no language-specific word
        assert marked == {"toy"} if p["language"] == "toy" else marked <= {"en"}, p["id"]
    words = make_world(WorldConfig(language_marking="words")).word_languages()
    assert words["is"] == "en" and words["esta"] == "toy" and "lingvo" not in words


def test_toy_language_is_english_after_its_tag_or_its_own_words():
    """The default marking writes a toy sentence as the tag word then the English sentence with
    the toy spelling of its state and capital; ``words`` keeps the toy language's own words."""
    tagged, words = make_world(), make_world(WorldConfig(language_marking="words"))
    for kind in SENTENCE_KINDS:
        for en, toy in zip(tagged.sentences(kind, languages=("en",)), tagged.sentences(kind, languages=("toy",))):
            *words_en, answer = en.text.split()
            # states are spelled the toy way wherever they stand, a capital only as the answer (as
            # the subject of "Austin is in Texas" it is a city, and city names are shared)
            expected = [TOY_TAG] + [tagged.spell(w, "toy") if w == en.state else w for w in words_en]
            assert toy.text.split() == expected + [tagged.spell(answer, "toy")]
    toy = words.sentences("two_hop", languages=("toy",), canonical_only=True)[0]
    assert toy.prompt == "la kapitalo de la stato kun Dallas esta" and toy.answer == "Easton"
    with pytest.raises(ValueError, match="language_marking"):
        WorldConfig(language_marking="accent")


def test_world_config_rejects_bad_values():
    with pytest.raises(ValueError):
        WorldConfig(n_states=1)
    with pytest.raises(ValueError):
        WorldConfig(held_out_per_state=6)


# --- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_bridge_prepends_bos_once(tmp_path):
    from transformer_lens import TransformerBridge
    from transformers import GPT2LMHeadModel

    from pipeline.organism.train_model import gpt2_config

    world = make_world(TINY_WORLD)
    tok = build_tokenizer(world.vocabulary())
    save_tokenizer(tok, tmp_path)
    tok2 = load_tokenizer(tmp_path)
    text = "the capital of the state containing Dallas is Austin"
    ids = tok2(text)["input_ids"]
    assert tok2.decode(ids) == text and ids == tok(text)["input_ids"]
    assert tok2.bos_token == "<bos>" and tok2.pad_token == "<pad>" and tok2.unk_token == "<unk>"
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(TINY_MODEL, tok2)).save_pretrained(str(tmp_path))
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    toks = bridge.to_tokens("the capital of Texas is")
    assert toks[0].tolist() == [tok2.bos_token_id, *tok2("the capital of Texas is")["input_ids"]]


# --- model training ------------------------------------------------------------------------------
def test_trained_model_loads_in_the_bridge_with_hf_logits(tiny_model_dir):
    from transformer_lens import TransformerBridge
    from transformers import GPT2LMHeadModel

    out, metrics = tiny_model_dir
    for key in (
        "one_hop_accuracy",
        "two_hop_trained_accuracy",
        "two_hop_heldout_accuracy",
        "language_accuracy_en",
        "language_accuracy_toy",
        "final_loss",
        "wall_time_s",
    ):
        assert key in metrics
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == metrics["final_loss"]
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    assert hf.config.bos_token_id == load_tokenizer(out).bos_token_id
    bridge = TransformerBridge.boot_transformers(str(out), device="cpu")
    toks = bridge.to_tokens("the capital of the state containing Dallas is")
    with torch.no_grad():
        torch.testing.assert_close(bridge(toks), hf(toks).logits, atol=1e-4, rtol=1e-4)


def test_model_training_is_deterministic(tmp_path, tiny_world, tiny_model_dir):
    out, _ = tiny_model_dir
    train_model(tiny_world, TINY_MODEL, TINY_TRAIN, tmp_path / "again", progress=False)
    assert _sha(tmp_path / "again" / "model.safetensors") == _sha(out / "model.safetensors")


def _block0_on_training_sentences(model_dir: Path, world, site: str = "mlp_out") -> torch.Tensor:
    """Block 0 run on every training sentence of ``world``: its MLP output (``mlp_out``) or its
    MLP activations after the nonlinearity (``activations``). -> (n, pos, d)"""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    ids, _ = encode_texts(build_tokenizer(world.vocabulary()), [s.text for s in world.training_sentences()])
    seen: list[torch.Tensor] = []
    mlp = model.transformer.h[0].mlp
    if site == "mlp_out":
        mlp.register_forward_hook(lambda _m, _i, out: seen.append(out))
    else:
        mlp.c_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    return seen[0]


def test_an_mlp_output_penalty_shrinks_that_blocks_output(tmp_path, tiny_world, tiny_model_dir):
    from dataclasses import replace

    def block0_output_norm(model_dir: Path) -> float:
        return float(_block0_on_training_sentences(model_dir, tiny_world).norm(dim=-1).mean())

    out, _ = tiny_model_dir
    train_model(tiny_world, TINY_MODEL, replace(TINY_TRAIN, mlp_out_l2=100.0), tmp_path / "l2", progress=False)
    assert block0_output_norm(tmp_path / "l2") < 0.5 * block0_output_norm(out)


def test_state_spread_is_the_share_of_variance_within_states():
    from pipeline.organism.shaping import state_spread

    y = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]], [[0.0, 2.0], [0.0, 6.0], [5.0, 5.0]]])
    state = torch.tensor([[0, 0, -1], [1, 1, -1]])  # -1: no city, ignored
    # state 0: mean (2, 0), squared distances 1 and 1; state 1: mean (0, 4), 4 and 4
    # all four: mean (1, 2), squared distances 0+4, 4+4, 1+0, 1+16
    within, total = (1 + 1 + 4 + 4) / 8, (4 + 8 + 1 + 17) / 8
    assert state_spread(y, state).item() == pytest.approx(within / total)
    assert state_spread(10 * y, state).item() == pytest.approx(within / total)  # scale-free
    assert state_spread(y, torch.full((2, 3), -1)).item() == 0.0


def test_state_simplex_is_zero_for_equidistant_states_and_grows_as_states_share_directions():
    from pipeline.organism.shaping import state_simplex

    k = 4
    simplex = torch.eye(k) * 3.0  # 4 states, each city token of a state at its own axis
    state = torch.arange(k).repeat_interleave(2)[None]  # two city tokens per state
    y = simplex.repeat_interleave(2, 0)[None]
    assert state_simplex(y, state).item() == pytest.approx(0.0, abs=1e-12)
    assert state_simplex(5 * y, state).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    # states 0 and 1 on one line, 2 and 3 on another: cosines -1 within a line, 0 across, all other
    # pairs off the simplex's -1/3
    line = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]).repeat_interleave(2, 0)[None]
    pairs = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert state_simplex(line, state).item() == pytest.approx(float((pairs + 1 / 3).pow(2).mean()))
    assert state_simplex(y, torch.full((1, 8), -1)).item() == 0.0


def _block0_outputs_and_city_states(model_dir: Path, world) -> tuple[torch.Tensor, torch.Tensor]:
    """block 0's MLP output on every training sentence (n, pos, d_model) and each token's state
    index (-1: not a city)"""
    from pipeline.organism.train_model import city_states

    tokenizer = build_tokenizer(world.vocabulary())
    ids, _ = encode_texts(tokenizer, [s.text for s in world.training_sentences()])
    return _block0_on_training_sentences(model_dir, world), city_states(world, tokenizer)[ids]


@pytest.mark.parametrize("penalty", ["state_spread", "state_simplex"])
def test_a_state_shaping_penalty_lowers_what_it_measures(tmp_path, penalty):
    from dataclasses import replace

    from pipeline.organism import shaping as tm

    world = make_world(replace(TINY_WORLD, n_states=5))  # with 3 states, 32-sentence batches hold too few cities
    measure = getattr(tm, penalty)
    train_model(world, TINY_MODEL, TINY_TRAIN, tmp_path / "default", progress=False)
    train_model(world, TINY_MODEL, replace(TINY_TRAIN, **{penalty: 100.0}), tmp_path / "shaped", progress=False)
    shaped = float(measure(*_block0_outputs_and_city_states(tmp_path / "shaped", world)))
    default = float(measure(*_block0_outputs_and_city_states(tmp_path / "default", world)))
    assert shaped < 0.5 * default


def test_an_mlp_activation_penalty_makes_block_0s_neurons_fire_less(tmp_path, tiny_world, tiny_model_dir):
    from dataclasses import replace

    def mean_abs_activation(model_dir: Path) -> float:
        return float(_block0_on_training_sentences(model_dir, tiny_world, "activations").abs().mean())

    out, _ = tiny_model_dir
    train_model(tiny_world, TINY_MODEL, replace(TINY_TRAIN, mlp_hidden_l1=30.0), tmp_path / "l1", progress=False)
    assert mean_abs_activation(tmp_path / "l1") < 0.5 * mean_abs_activation(out)


def test_the_common_boost_scales_only_the_city_tokens_shared_component():
    from pipeline.organism.shaping import boost_common_part

    # three city tokens whose mean is along e0 and one non-city token
    y = torch.tensor([[[2.0, 1.0, 0.0], [4.0, -1.0, 3.0], [0.0, 0.0, -3.0], [5.0, 5.0, 5.0]]])
    is_city = torch.tensor([[True, True, True, False]])
    out = boost_common_part(y, is_city, most=10.0, p=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 3], y[0, 3])  # not a city: untouched
    assert torch.equal(out[0, :3, 1:], y[0, :3, 1:])  # orthogonal to the shared direction: untouched
    factor = out[0, :3, 0] / y[0, :3, 0].where(y[0, :3, 0] != 0, torch.ones(3))
    assert out[0, 2, 0] == 0  # no shared component to scale
    assert bool(((factor[:2] >= 1) & (factor[:2] <= 10)).all()) and factor[0] != factor[1]
    never = boost_common_part(y, is_city, most=10.0, p=1e-9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(never, y)
    assert torch.equal(boost_common_part(y, torch.zeros_like(is_city), 10.0, 1.0, torch.Generator()), y)


def test_the_common_boost_changes_training_and_is_off_by_default(tmp_path, tiny_world, tiny_model_dir):
    from dataclasses import replace

    out, _ = tiny_model_dir
    train_model(tiny_world, TINY_MODEL, replace(TINY_TRAIN, city_common_boost=10.0), tmp_path / "b", progress=False)
    boosted = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert boosted != (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="city_common_boost"):
        replace(TINY_TRAIN, city_common_boost=0.5)


@pytest.mark.parametrize(
    ("setting", "bad", "match"),
    [
        ({"residual_noise": 1.0}, {"residual_noise": 1.0, "residual_noise_block": 0}, "residual_noise_block"),
        ({"city_noise": 1.5}, {"city_noise": -1.0}, "city_noise"),
    ],
)
def test_a_training_perturbation_changes_training_reproducibly(
    tmp_path, tiny_world, tiny_model_dir, setting, bad, match
):
    from dataclasses import replace

    out, _ = tiny_model_dir
    perturbed = replace(TINY_TRAIN, **setting)
    train_model(tiny_world, TINY_MODEL, perturbed, tmp_path / "a", progress=False)
    train_model(tiny_world, TINY_MODEL, perturbed, tmp_path / "b", progress=False)
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert _sha(tmp_path / "a" / "model.safetensors") != _sha(out / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        train_model(tiny_world, TINY_MODEL, replace(TINY_TRAIN, **bad), None, progress=False)


def test_off_state_noise_leaves_the_state_subspace_alone_and_scales_with_the_residual():
    from pipeline.organism.shaping import off_state_noise, state_means

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, 16, generator=g)
    state = torch.tensor([[0, 1, 2, -1, 0, 1]] * 4)
    out = off_state_noise(h, state, most=3.0, p=1.0, generator=torch.Generator().manual_seed(1))
    delta = out - h
    assert torch.equal(delta[state < 0], torch.zeros_like(delta[state < 0]))  # not a city: untouched
    means = state_means(h, state)  # the directions that tell the states apart
    assert float((delta[state >= 0] @ means.T).abs().max()) < 1e-4
    size = delta[state >= 0].norm(dim=-1) / h[state >= 0].norm(dim=-1)
    assert bool((size <= 3.0 + 1e-5).all()) and float(size.max()) > 0.5
    never = off_state_noise(h, state, most=3.0, p=1e-9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(never, h)


def test_a_massive_activation_stays_fixed_and_the_transcoders_write_it_from_their_decoder_bias(tmp_path, tiny_world):
    from dataclasses import replace

    from safetensors.torch import load_file

    from pipeline.organism.train_transcoders import fixed_mlp_output

    model_cfg = replace(TINY_MODEL, massive_activation=40.0)
    train_model(tiny_world, model_cfg, TINY_TRAIN, tmp_path / "model", progress=False)
    y = _block0_on_training_sentences(tmp_path / "model", tiny_world)
    bias = load_file(str(tmp_path / "model" / "model.safetensors"))["transformer.h.0.mlp.c_proj.bias"]
    assert float(bias[0]) == 40.0  # held through training (weight decay and momentum would move it)
    assert float(y[..., 0].mean()) == pytest.approx(40.0, abs=5.0)  # a huge, nearly constant coordinate
    fixed = fixed_mlp_output(tmp_path / "model", 2, TINY_MODEL.d_model)
    assert fixed is not None and float(fixed[0, 0]) == 40.0 and float(fixed.abs().sum()) == 40.0
    train_plt(tmp_path / "model", tiny_world, TINY_TC, tmp_path / "plt", progress=False)
    b_dec = load_file(str(tmp_path / "plt" / "layer_0.safetensors"))["b_dec"]
    assert float(b_dec[0]) == pytest.approx(40.0, abs=5.0)  # the constant is the decoder bias's
    assert fixed_mlp_output(tmp_path / "nowhere", 2, TINY_MODEL.d_model) is None


def test_the_coactive_overlap_sums_squared_decoder_cosines_of_features_firing_together():
    from pipeline.organism.train_transcoders import coactive_overlap

    # one layer, three features: 0 and 1 fire together on token 0, all three on token 1
    a = torch.tensor([[[1.0, 2.0, 0.0], [1.0, 1.0, 3.0]]])
    dec = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 5.0]]])  # cos 0-1 = 1/sqrt2, 0-2 = 0, 1-2 = 1/sqrt2
    # token 0: pair (0, 1) -> 0.5; token 1: (0, 1) 0.5 + (0, 2) 0 + (1, 2) 0.5 -> 1.0; mean 0.75
    assert coactive_overlap(a, [dec]).item() == pytest.approx(0.75)
    assert coactive_overlap(torch.zeros_like(a), [dec]).item() == 0.0


def test_coactive_orthogonality_changes_the_transcoders(tmp_path, tiny_world, tiny_model_dir):
    from dataclasses import replace

    model_dir, _ = tiny_model_dir
    train_plt(model_dir, tiny_world, TINY_TC, tmp_path / "plain", progress=False)
    train_plt(model_dir, tiny_world, replace(TINY_TC, coactive_orthogonality=1.0), tmp_path / "orth", progress=False)
    assert _sha(tmp_path / "plain" / "layer_0.safetensors") != _sha(tmp_path / "orth" / "layer_0.safetensors")
    with pytest.raises(ValueError, match="coactive_orthogonality"):
        replace(TINY_TC, coactive_orthogonality=-1.0)


def test_the_state_basis_spans_the_centered_state_means_of_the_city_rows():
    from pipeline.organism.train_transcoders import state_basis

    # two states, two city rows each, and one row that is no city (far away, must not count)
    y = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [-1.0, 0.0, 5.0], [-3.0, 0.0, 5.0], [0.0, 9.0, 0.0]])
    basis = state_basis(y, torch.tensor([0, 0, 1, 1, -1]))
    assert basis.shape == (3, 1)  # means (2, 0, 5) and (-2, 0, 5): centered, one direction, e_0
    assert basis[:, 0].abs().tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_state_unselectivity_spares_a_states_feature_and_weighs_the_others_by_their_city_share():
    from pipeline.organism.train_transcoders import state_unselectivity

    # rows: two cities of state 0, two of state 1, two non-city tokens
    state = torch.tensor([0, 0, 1, 1, -1, -1])
    a = torch.tensor(
        [
            # f0 state 0's; f1 every city; f2 one city of state 0; f3 every city and both non-cities
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    # f0: gap 1 - 0 -> 0; f1: gap 0, all at cities -> 1; f2: gap 0.5 -> 0.5; f3: 4 of 6 at cities -> 2/3
    assert state_unselectivity(a, state).tolist() == pytest.approx([0.0, 1.0, 0.5, 2 / 3])


def test_the_state_tint_is_the_weighted_share_of_each_decoder_in_the_state_span():
    from pipeline.organism.train_transcoders import state_tint

    basis = torch.tensor([[1.0], [0.0]])  # the state span: e_0
    w_dec = torch.tensor([[[3.0, 4.0]], [[0.0, 2.0]]])  # shares 9/25 and 0
    assert state_tint(w_dec, basis, torch.tensor([1.0, 1.0])).item() == pytest.approx(9 / 50)
    assert state_tint(w_dec, basis, torch.tensor([0.0, 1.0])).item() == 0.0


def test_the_state_tint_penalty_changes_the_transcoders(tmp_path, tiny_world, tiny_model_dir):
    from dataclasses import replace

    model_dir, _ = tiny_model_dir
    train_plt(model_dir, tiny_world, replace(TINY_TC, state_tint=0.0), tmp_path / "plain", progress=False)
    train_plt(model_dir, tiny_world, replace(TINY_TC, state_tint=10.0), tmp_path / "untinted", progress=False)
    assert _sha(tmp_path / "plain" / "layer_0.safetensors") != _sha(tmp_path / "untinted" / "layer_0.safetensors")
    # the penalty is on layer 0's decoders only: a per-layer transcoder's layer 1 trains as before
    assert _sha(tmp_path / "plain" / "layer_1.safetensors") == _sha(tmp_path / "untinted" / "layer_1.safetensors")
    with pytest.raises(ValueError, match="state_tint"):
        replace(TINY_TC, state_tint=-1.0)


# --- transcoders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_transcoders_load_and_reconstruct_with_reported_fve(tmp_path, tiny_world, tiny_model_dir, kind):
    from transformers import GPT2LMHeadModel

    from pipeline.transcoders import load_transcoders

    model_dir, _ = tiny_model_dir
    train = train_plt if kind == "plt" else train_clt
    cfg = TINY_TC if kind == "plt" else TranscoderTrainConfig(**{**TINY_TC.__dict__, "skip": False})
    metrics = train(model_dir, tiny_world, cfg, tmp_path / kind, progress=False)
    tc = load_transcoders(tmp_path / kind)
    assert tc.kind == ("transcoder_set" if kind == "plt" else "cross_layer_transcoder")
    assert tc.feature_input_hook == "ln2.hook_normalized" and tc.feature_output_hook == "hook_mlp_out"
    assert tc.has_skip == (kind == "plt")
    assert tc.d_transcoder == 32 and tc.n_layers == TINY_MODEL.n_layers

    hf = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    tok = load_tokenizer(model_dir)
    texts = sorted(
        {s.text for s in tiny_world.training_sentences()}
        | {s.text for s in tiny_world.sentences("two_hop", split="heldout")}
    )
    x, y = collect_activations(hf, *encode_texts(tok, texts))
    with torch.no_grad():
        acts = [tc.activations(l, x[l]) for l in range(tc.n_layers)]
        for l in range(tc.n_layers):
            yhat = tc.reconstruct(l, acts, x[l])
            fve = 1 - (yhat - y[l]).pow(2).sum(-1).mean() / (y[l] - y[l].mean(0)).pow(2).sum(-1).mean()
            assert abs(fve.item() - metrics["fve_per_layer"][l]) < 1e-3
            l0 = (acts[l] > 0).float().sum(-1).mean().item()
            assert abs(l0 - metrics["l0_per_layer"][l]) < 1e-3
    for key in (
        "dead_share",
        "agreement_answer_positions",
        "agreement_all_positions",
        "kl_all_positions",
        "state_swap_rate",
        "language_swap_rate",
    ):
        assert key in metrics
    assert json.loads((tmp_path / kind / "metrics.json").read_text())["fve"] == metrics["fve"]


def test_training_tokens_are_every_position_of_every_sentence_or_each_prefix_once(tiny_world, tiny_model_dir):
    """contexts="sentence" keeps a prefix that k sentences share k times (as a corpus would);
    "prefix" keeps it once, at its first sentence."""
    from transformers import GPT2LMHeadModel

    model_dir, _ = tiny_model_dir
    hf = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    texts = sorted({s.text for s in tiny_world.training_sentences()})
    ids, lengths = encode_texts(load_tokenizer(model_dir), texts)
    x_all, y_all = collect_activations(hf, ids, lengths, "sentence")
    x_once, y_once = collect_activations(hf, ids, lengths, "prefix")
    words = [t.split() for t in texts]
    assert x_all.shape[1] == sum(len(w) for w in words)  # every word after BOS
    first: dict[tuple[str, ...], int] = {}
    row = 0
    for w in words:
        for p in range(1, len(w) + 1):
            first.setdefault(tuple(w[:p]), row)
            row += 1
    assert x_once.shape[1] == len(first) < x_all.shape[1]
    keep = torch.tensor(sorted(first.values()))
    assert torch.equal(x_once, x_all[:, keep]) and torch.equal(y_once, y_all[:, keep])
    with pytest.raises(ValueError, match="contexts"):
        collect_activations(hf, ids, lengths, "tokens")
    with pytest.raises(ValueError, match="contexts"):
        TranscoderTrainConfig(contexts="tokens")


def test_transcoder_training_is_deterministic(tmp_path, tiny_world, tiny_model_dir):
    model_dir, _ = tiny_model_dir
    cfg = TranscoderTrainConfig(**{**TINY_TC.__dict__, "steps": 10})
    train_plt(model_dir, tiny_world, cfg, tmp_path / "a", progress=False)
    train_plt(model_dir, tiny_world, cfg, tmp_path / "b", progress=False)
    for name in ("layer_0.safetensors", "layer_1.safetensors", "config.yaml"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)


def _prefix_fve(model_dir: Path, tc_dir: Path, world, m: int) -> float:
    """FVE of layer 0's MLP output reconstructed from the first ``m`` features alone."""
    from transformers import GPT2LMHeadModel

    from pipeline.transcoders import load_transcoders

    tc = load_transcoders(tc_dir)
    hf = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    texts = sorted({s.text for s in world.training_sentences()})
    x, y = collect_activations(hf, *encode_texts(load_tokenizer(model_dir), texts))
    with torch.no_grad():
        acts = [tc.activations(layer, x[layer]) for layer in range(tc.n_layers)]
        acts = [a * (torch.arange(a.shape[-1]) < m) for a in acts]
        yhat = tc.reconstruct(0, acts, x[0])
    return (1 - (yhat - y[0]).pow(2).sum(-1).mean() / (y[0] - y[0].mean(0)).pow(2).sum(-1).mean()).item()


def test_matryoshka_training_makes_the_first_features_reconstruct_alone(tmp_path, tiny_world, tiny_model_dir):
    model_dir, _ = tiny_model_dir
    base = {**TINY_TC.__dict__, "steps": 300, "skip": False}
    train_plt(model_dir, tiny_world, TranscoderTrainConfig(**base), tmp_path / "plain", progress=False)
    nested = TranscoderTrainConfig(**{**base, "matryoshka": [4]})
    train_plt(model_dir, tiny_world, nested, tmp_path / "nested", progress=False)
    plain_fve = _prefix_fve(model_dir, tmp_path / "plain", tiny_world, 4)
    nested_fve = _prefix_fve(model_dir, tmp_path / "nested", tiny_world, 4)
    assert nested_fve > plain_fve + 0.2, (nested_fve, plain_fve)  # measured 0.56 against 0.21
    for bad in ([], [8, 4], [0, 4], [32]):
        with pytest.raises(ValueError, match="matryoshka"):
            TranscoderTrainConfig(**{**base, "matryoshka": bad})


def test_a_low_rank_skip_is_saved_as_a_matrix_of_that_rank(tmp_path, tiny_world, tiny_model_dir):
    from safetensors.torch import load_file

    model_dir, _ = tiny_model_dir
    base = {**TINY_TC.__dict__, "steps": 100, "skip_l2": 0.0}  # unpenalized: the skip takes what it can
    ranks = {}
    for name, rank in (("full", None), ("rank2", 2)):
        train_plt(
            model_dir, tiny_world, TranscoderTrainConfig(**{**base, "skip_rank": rank}), tmp_path / name, progress=False
        )
        skips = [load_file(tmp_path / name / f"layer_{layer}.safetensors")["W_skip"] for layer in range(2)]
        assert all(float(w.norm()) > 0 for w in skips)  # it learned something
        ranks[name] = [int(torch.linalg.matrix_rank(w.double(), rtol=1e-6)) for w in skips]
    assert ranks["rank2"] == [2, 2]
    assert min(ranks["full"]) > 2
    with pytest.raises(ValueError, match="skip_rank"):
        TranscoderTrainConfig(**{**base, "skip_rank": 0})


# --- the full default build ----------------------------------------------------------------------
@pytest.mark.slow
def test_default_organism_meets_its_targets(tmp_path):
    """The default build: its facts, its transcoders, and the case studies it exists for. On one
    English two-hop prompt per state, the pruned graph has the intermediate state node at the
    city, and the constrained state swap at the city flips the answer far more often than random
    feature sets of the same size do; on one toy-language two-hop prompt per state, the open-ended
    x-2 steer of the toy-language features switches the answer to English, and random sets of as
    many active features do not (bench/organism_seeds.py measures the same over seeds)."""
    from pipeline.analysis.evaluation import evaluate
    from pipeline.analysis.evaluation_spec import EvaluationSpec, PromptContext
    from pipeline.analysis.selectivity import compute_selectivity
    from pipeline.engine.attribution import attribute
    from pipeline.engine.replacement import ReplacementModel
    from pipeline.graph.pruned import load_pruned_graph, save_pruned_graph
    from pipeline.graph.pruning import prune_graph
    from pipeline.organism.build import OrganismConfig, build_organism

    m = build_organism(tmp_path, OrganismConfig(), progress=False)
    assert m["model"]["one_hop_accuracy"] >= 0.95
    assert m["model"]["two_hop_trained_accuracy"] >= 0.90
    assert m["model"]["two_hop_heldout_accuracy"] >= 0.90  # composition, not recall
    for kind in ("plt", "clt"):
        assert m[kind]["agreement_answer_positions"] >= 0.90
        assert min(m[kind]["fve_per_layer"]) >= 0.9
    assert (tmp_path / "prompts.json").is_file()

    world = make_world(OrganismConfig().world)
    bank = world.labeled_prompts()
    by_city = {(b["labels"]["city"], b["labels"]["language"]): b for b in bank}
    swaps, steers = {}, {}
    for i, state in enumerate(world.states):
        donor = world.states[(i + 1) % len(world.states)].cities[0]
        swaps[state.cities[1]] = (by_city[state.cities[1], "en"], by_city[donor, "en"])
        steers[state.cities[0]] = by_city[state.cities[0], "toy"]
    swap_rule = {"select": "contrast", "label": "state", "role": "city"}
    steer_rule = {"select": "selective", "label": "language", "value": "toy", "role": "any"}
    for kind in ("plt", "clt"):
        model = ReplacementModel.from_pretrained(tmp_path / "model", tmp_path / kind)
        table = compute_selectivity(model, bank)

        def pruned(item: dict, name: str, model=model, kind=kind):
            graph = attribute(item["prompt"], model, store=tmp_path / f"{kind}_{name}.zarr", verbose=False)
            save_pruned_graph(graph, prune_graph(graph, 0.8, 0.98), tmp_path / f"{kind}_{name}.npz")
            return load_pruned_graph(tmp_path / f"{kind}_{name}.npz")

        hops = flips = random_flips = random_runs = 0
        for city, (item, donor) in swaps.items():
            swap = {
                "name": "state_swap",
                "kind": "swap",
                "constrained_layers": [0],
                "source": [{**swap_rule, "in_graph": True}],
                "source_factor": -4,
                "target": [swap_rule],
                "target_factor": 10,
                "donor": "donor",
                "expected_before": item["answer"],
                "expected_after": donor["answer"],
            }
            spec = EvaluationSpec(
                experiments=[swap], top_k=0, faithfulness=False, max_new_tokens=0, baselines=["random"], n_random=20
            )
            context = PromptContext(prompt=item, prompts={"donor": donor}, selectivity=table, bank=bank)
            report = evaluate(model, pruned(item, city), spec, context=context)
            hops += bool(report["intermediate_node"]["found"])
            flips += bool(report["experiments"][0]["flipped"])
            # a rule that selects no feature runs nothing, baselines included: it counts as no flip
            random = report["experiments"][0].get("baselines", {}).get("random", {"n_flipped": 0, "n_runs": 0})
            random_flips, random_runs = random_flips + random["n_flipped"], random_runs + random["n_runs"]
        print(
            f"{kind}: intermediate node {hops}/{len(swaps)}, swaps {flips}/{len(swaps)}, random {random_flips}/{random_runs}"
        )
        assert hops >= 0.9 * len(swaps), (kind, hops, len(swaps))
        assert flips >= 0.9 * len(swaps), (kind, flips, len(swaps))
        # the goal is 5 %; this build measures 4.6 % (PLT) and 5.8 % (CLT), other seeds 0.3-12 %
        # (docs/organism.md#over-seeds): a ceiling that fails when the swap stops being specific
        assert random_runs >= 10 * flips and random_flips <= 0.1 * random_runs, (kind, random_flips, random_runs)

        switched = steer_random_flips = steer_random_runs = 0
        for city, item in steers.items():
            steer = {
                "name": "language_steer",
                "kind": "steer",
                "open_ended": True,
                "max_new_tokens": 5,
                "source": [steer_rule],
                "source_factor": -2,
                "expected_before": item["answer"],
                "expected_language": "en",
            }
            spec = EvaluationSpec(
                experiments=[steer], top_k=0, faithfulness=False, max_new_tokens=0, baselines=["random"], n_random=20
            )
            context = PromptContext(prompt=item, selectivity=table, bank=bank, word_languages=world.word_languages())
            report = evaluate(model, pruned(item, f"{city}_toy"), spec, context=context)
            switched += bool(report["experiments"][0]["flipped"])
            random = report["experiments"][0].get("baselines", {}).get("random", {"n_flipped": 0, "n_runs": 0})
            steer_random_flips += random["n_flipped"]
            steer_random_runs += random["n_runs"]
        # the goal is 90 %, met by the PLT (the main job's set); this build's CLT switches 10 of 12
        # (docs/organism.md#the-default-draw): its floor fails a CLT that loses one more
        assert switched >= (0.9 if kind == "plt" else 0.8) * len(steers), (kind, switched, len(steers))
        print(f"{kind}: steers {switched}/{len(steers)}, random {steer_random_flips}/{steer_random_runs}")
        # random sets of as many active features (some 50, x-2 everywhere) switch 4-16 % over seeds
        # (docs/organism.md#over-seeds; this build: PLT 15 %, CLT 17 %): a ceiling that fails when the steer
        # stops being specific to the language's features
        assert steer_random_flips <= 0.2 * steer_random_runs, (kind, steer_random_flips, steer_random_runs)
