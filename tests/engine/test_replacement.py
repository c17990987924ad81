"""The replacement model: reproduces the base model with errors added back, is exactly linear
when frozen, and refuses bad input with a clear error."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipeline import testing
from pipeline.engine.replacement import ReplacementModel
from pipeline.engine.tokens import PromptError

ARCHS = ["tiny_gpt2_dir", "tiny_llama_dir"]
KINDS = ["plt_dir", "plt_skip_dir", "clt_dir", "gemmascope_dir"]


def prompt_for(model_dir) -> str:
    return " ".join(testing.vocabulary_words(model_dir)[3:10])


@pytest.fixture
def make_model(request):
    def make(arch, kind, dtype=torch.float32):
        return ReplacementModel.from_pretrained(
            request.getfixturevalue(arch), request.getfixturevalue(kind), dtype=dtype
        )

    return make


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_replacement_with_errors_reproduces_base_logits(make_model, request, arch, kind):
    model = make_model(arch, kind)
    prompt = prompt_for(request.getfixturevalue(arch))
    cap = model.capture(prompt)
    base = model.bridge(cap.tokens[None])[0]
    torch.testing.assert_close(cap.logits, base, rtol=0, atol=0)
    logits = model.run_replacement(prompt, errors=cap.errors)
    assert (logits - base).abs().max() <= 1e-5
    # without the errors the replacement model is a different model
    assert (model.run_replacement(prompt) - base).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_activations_are_zero_at_bos_and_sparse_matches_dense(make_model, request, arch):
    model = make_model(arch, "plt_dir")
    prompt = prompt_for(request.getfixturevalue(arch))
    logits, sparse = model.get_activations(prompt, sparse=True)
    _, dense = model.get_activations(prompt, sparse=False)
    assert sparse.is_sparse and sparse.shape == dense.shape == (model.n_layers, logits.shape[0], 64)
    torch.testing.assert_close(sparse.to_dense(), dense)
    assert dense[:, 0].abs().max() == 0
    assert (dense > 0).any()
    tokens = model.tokenize(prompt)
    assert tokens[0] == model.tokenizer.bos_token_id and (tokens[1:] != model.tokenizer.bos_token_id).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["plt_dir", "plt_skip_dir", "clt_dir"])
def test_frozen_model_is_linear_in_a_feature_decoder_contribution(make_model, request, arch, kind):
    """Adding t times one feature's decoder output moves every later quantity by t times the
    change at t = 1: the frozen residual stream is linear in decoder outputs."""
    model = make_model(arch, kind, torch.float64)
    cap = model.capture(prompt_for(request.getfixturevalue(arch)))
    idx, values = cap.active_features()
    layer, pos, feat = (int(v) for v in idx[0])
    dec = model.transcoders.decoder_vectors(layer, torch.tensor([feat]))[0] * values[0]
    ff = model.frozen_forward(cap, batch=3)
    # batch element b gets b times the feature's output added at each of its output layers
    steps = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    delta = {}
    for j, out_layer in enumerate(model.transcoders.output_layers(layer)):
        add = torch.zeros_like(ff.mlp_outputs[out_layer])
        add[:, pos] = steps[:, None] * dec[j]
        delta[out_layer] = add

    # rerun through the same frozen machinery with the additions folded into the leaves
    reads = {}

    def read(l):
        def hook(t, *, hook):
            reads[l] = t

        return hook

    def write(l):
        def hook(t, *, hook):
            y = cap.mlp_outputs[l].expand(3, -1, -1).clone() + delta.get(l, 0)
            skip = model.transcoders.skip(l, reads[l])
            if skip is not None:
                y = y + skip - model.transcoders.skip(l, cap.mlp_inputs[l])
            return y

        return hook

    patterns = {}

    def save(t, *, hook):
        patterns[hook.name] = t.detach()

    with model.hooks([(n, save) for n in model.pattern_hooks + model.scale_hooks]):
        model.bridge(cap.tokens[None])
    fwd = [(n, lambda t, *, hook: patterns[hook.name].expand_as(t)) for n in patterns]
    for l in range(model.n_layers):
        fwd += [(model.input_hooks[l], read(l)), (model.output_hooks[l], write(l))]
    with model.hooks(fwd), torch.no_grad():
        logits = model.bridge(cap.tokens[None].expand(3, -1))
    d1 = logits[1] - logits[0]
    d2 = logits[2] - logits[0]
    assert d1.abs().max() > 1e-6, "the feature has no downstream effect to test"
    torch.testing.assert_close(d2, 2 * d1, rtol=1e-9, atol=1e-12)
    # and the frozen forward of the attribution engine has the clean values
    torch.testing.assert_close(ff.logits[0], cap.logits, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- bad input
def test_transcoders_for_another_d_model_are_refused(tmp_path, tiny_gpt2_dir):
    tc = testing.make_random_plt(tmp_path / "tc", n_layers=2, d_model=8, d_transcoder=16)
    with pytest.raises(ValueError, match="d_model"):
        ReplacementModel.from_pretrained(tiny_gpt2_dir, tc)


def test_transcoders_for_another_number_of_layers_are_refused(tmp_path, tiny_gpt2_dir):
    tc = testing.make_random_plt(tmp_path / "tc", n_layers=3, d_model=16, d_transcoder=16)
    with pytest.raises(ValueError, match="layers"):
        ReplacementModel.from_pretrained(tiny_gpt2_dir, tc)


def test_unknown_hook_name_is_refused(tmp_path, tiny_gpt2_dir, plt_dir):
    bad = tmp_path / "tc"
    shutil.copytree(plt_dir, bad)
    cfg = (bad / "config.yaml").read_text().replace("hook_mlp_out", "hook_mlp_outt")
    (bad / "config.yaml").write_text(cfg)
    with pytest.raises(ValueError, match="hook_mlp_outt"):
        ReplacementModel.from_pretrained(tiny_gpt2_dir, bad)


def test_model_directory_without_tokenizer_is_refused(tmp_path, tiny_gpt2_dir, plt_dir):
    bare = tmp_path / "model"
    bare.mkdir()
    for f in tiny_gpt2_dir.iterdir():
        if "token" not in f.name and f.name not in ("vocab.json", "special_tokens_map.json"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        ReplacementModel.from_pretrained(bare, plt_dir)


def test_empty_and_too_long_prompts_are_refused(tiny_gpt2_dir, plt_dir):
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)
    for empty in ["", "   "]:
        with pytest.raises(PromptError, match="empty"):
            model.capture(empty)
    words = testing.vocabulary_words(tiny_gpt2_dir)[3:6]
    with pytest.raises(PromptError, match=f"context is {model.n_ctx}"):
        model.capture(" ".join(words * model.n_ctx))


def test_nan_in_model_weights_is_refused_at_load_naming_the_tensor(tmp_path, tiny_gpt2_dir, plt_dir):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, damaged)
    weights = load_file(str(damaged / "model.safetensors"))
    weights["transformer.h.1.mlp.c_fc.weight"][3] = float("nan")  # one row of an MLP weight
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"weight transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or inf; the checkpoint is damaged"
    ):
        ReplacementModel.from_pretrained(damaged, plt_dir)
    weights["transformer.h.1.mlp.c_fc.weight"][3] = float("inf")
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="re-download or re-train"):
        ReplacementModel.from_pretrained(damaged, plt_dir)


def test_non_finite_residual_stream_at_capture_names_layer_and_position(tiny_gpt2_dir, plt_dir):
    """Weights that overflow only on some input (here: made non-finite after the load check)
    give an error naming the first layer and position, not NaN graphs."""
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)
    prompt = prompt_for(tiny_gpt2_dir)
    model.capture(prompt)  # finite: no error
    params = model.bridge.original_model.named_parameters()
    w = {n.replace("._original_component", ""): p for n, p in params}["transformer.h.1.mlp.c_proj.weight"]
    w.data[:, 0] = float("inf")  # every hidden unit writes inf into dimension 0
    with pytest.raises(ValueError, match=r"residual stream holds NaN or inf at layer 1's MLP output, position 0"):
        model.capture(prompt)


def test_text_prompts_that_are_not_text_are_clear_errors(tiny_gpt2_dir, plt_dir):
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)
    with pytest.raises(PromptError, match=r"the prompt is bytes, not text: decode it"):
        model.tokenize(b"the river")
    bad = b"the \xff river".decode("utf-8", "surrogateescape")  # what argv gives for non-UTF-8 bytes
    with pytest.raises(PromptError, match=r"not valid UTF-8 text \(byte 0xff\) at character 4"):
        model.tokenize(bad)
    with pytest.raises(PromptError, match="the prompt is a list, not text"):
        model.tokenize(["the", "river"])  # type: ignore[arg-type]


def test_token_id_tensors_are_checked(tiny_gpt2_dir, plt_dir):
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir)
    ids = model.tokenize(prompt_for(tiny_gpt2_dir)).cpu()
    assert model.tokenize(ids[None]).tolist() == ids.tolist()  # (1, n) is one prompt
    d_vocab = int(model.bridge.cfg.d_vocab)
    cases = [
        (ids.float(), r"integer tensor, got dtype torch.float32"),
        (torch.stack([ids, ids]), r"shape \(n,\) or \(1, n\).*got \(2, "),
        (torch.tensor([ids[0].item(), -1]), r"token id -1 at position 1 is outside the vocabulary"),
        (
            torch.tensor([ids[0].item(), d_vocab]),
            rf"token id {d_vocab} at position 1 is outside the vocabulary \[0, {d_vocab}\)",
        ),
    ]
    for bad, match in cases:
        with pytest.raises(PromptError, match=match):
            model.capture(bad)
