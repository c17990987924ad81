"""Prompt sets as data: every format loads the same records, bad sets are clear errors naming
the line, and templates × fillers expand in order."""

from __future__ import annotations

import json

import pytest

from pipeline.run.prompt_sets import PromptSetError, expand_templates, load_prompt_set


def test_prompt_set_formats_load_the_same_records(tmp_path):
    recs = [
        {"id": "a", "prompt": "x y", "answer": "z", "contrast": "x w", "tags": ["k=v", "t"]},
        {"id": "b", "prompt": "y x"},
    ]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "s.csv").write_text("id,prompt,answer,contrast,tags\na,x y,z,x w,k=v;t\nb,y x,,,\n")
    (tmp_path / "list.yaml").write_text("name: s\nprompts:\n" + "".join(f"  - {json.dumps(r)}\n" for r in recs))
    (tmp_path / "items.yaml").write_text(
        "name: s\nitems:\n  a: {prompt: x y, answer: z, tags: [k=v, t, 'contrast=x w']}\n  b: {prompt: y x}\n"
    )
    sets = [load_prompt_set(tmp_path / f) for f in ("s.jsonl", "s.csv", "list.yaml", "items.yaml")]
    for ps in sets:
        assert ps.ids == ["a", "b"]
        a = ps["a"]
        assert (a.prompt, a.answer, a.contrast, a.tag("k")) == ("x y", "z", "x w", "v")
        assert ps["b"].answer is None and ps["b"].contrast is None


@pytest.mark.parametrize(
    "name, text, match",
    [
        (
            "dup.jsonl",
            '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
            r"dup.jsonl:3: duplicate id 'a' \(first at .*dup.jsonl:1\)",
        ),
        (
            "dup.yaml",
            "name: s\nitems:\n  a: {prompt: x}\n  b: {prompt: y}\n  a: {prompt: z}\n",
            r"dup.yaml:5: duplicate key 'a' \(first at .*dup.yaml:3\)",
        ),
        ("empty.csv", "id,prompt\na,x\nb,   \n", r"empty.csv:3 \(id 'b'\): the prompt is empty"),
        (
            "empty.yaml",
            "prompts:\n  - {id: a, prompt: x}\n  - {id: b, prompt: ''}\n",
            r"empty.yaml:3 \(id 'b'\): the prompt is empty",
        ),
        ("noprompt.jsonl", '{"id": "a"}\n', r"noprompt.jsonl:1 \(id 'a'\): missing prompt"),
        ("badid.jsonl", '{"id": "a b", "prompt": "x"}\n', r"id 'a b' must match"),
        ("typo.jsonl", '{"id": "a", "prompt": "x", "anwser": "y"}\n', r"unknown field\(s\) \['anwser'\]"),
        ("bad.json", "{}", "unknown prompt set format"),
        ("none.yaml", "prompts: []\n", "no prompts"),
    ],
)
def test_bad_prompt_sets_are_clear_errors_naming_the_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(PromptSetError, match=match):
        load_prompt_set(tmp_path / name)


def test_every_problem_of_a_set_is_reported_at_once(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"id": "a", "prompt": ""}\n{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(PromptSetError) as info:
        load_prompt_set(tmp_path / "s.jsonl")
    msg = str(info.value)
    assert "3 problem(s)" in msg and "empty" in msg and "duplicate" in msg and "missing id" in msg


def test_unknown_prompt_set_name_lists_conf_prompts():
    with pytest.raises(FileNotFoundError, match="capitals"):
        load_prompt_set("no_such_set")


def test_templates_times_fillers(tmp_path):
    recs = expand_templates(
        ["a {x} b", "c {x}"], {"x": ["u", "v"]}, id="t{template}_{x}", answer="{x}!", tags=["x={x}"]
    )
    assert [(r.id, r.prompt, r.answer) for r in recs] == [
        ("t0_u", "a u b", "u!"),
        ("t0_v", "a v b", "v!"),
        ("t1_u", "c u", "u!"),
        ("t1_v", "c v", "v!"),
    ]
    assert recs[3].tags == ("x=v", "template=1")
    with pytest.raises(PromptSetError, match=r"needs filler\(s\) \['y'\]"):
        expand_templates(["{y}"], [{"x": 1}])
    (tmp_path / "g.yaml").write_text(
        "name: g\ngenerate:\n  templates: ['the {w} is']\n  id: 'w_{w}'\n  fillers: [{w: a}, {w: a}]\n"
    )
    with pytest.raises(PromptSetError, match="duplicate id 'w_a'"):
        load_prompt_set(tmp_path / "g.yaml")


def test_prompt_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "the river"}\n{"id": "b", "prompt": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(
        ValueError, match=r"set\.jsonl: not UTF-8 text \(byte 0xe9 on line 2\): save the prompt file as UTF-8"
    ):
        load_prompt_set(path)
