"""Prompt sets as data: what a prompt set is, and how it is read, validated and written.

A prompt set is an ordered list of :class:`PromptRecord` (id, prompt, expected answer,
optional contrast prompt, tags). Formats, chosen by the file's suffix:

* ``.yaml`` / ``.yml``, one of

  - the ``conf/prompts/<set>.yaml`` format the DVC pipeline composes (``PromptSetSpec``)::

        name: capitals
        items:
          two_hop_dallas: {prompt: ..., answer: Austin, tags: [state=Texas]}

  - a list of records, at the top level or under ``prompts:``::

        name: capitals
        prompts:
          - {id: two_hop_dallas, prompt: ..., answer: Austin, contrast: ..., tags: [...]}

  - a template × fillers generator (:func:`expand_templates`)::

        name: capitals
        generate:
          templates: ["the capital of the state containing {city} is"]
          id: "{city}_t{template}"          # {template} is the template's index
          answer: "{capital}"
          contrast: "the capital of the state containing {other_city} is"   # optional
          tags: ["state={state}", "city={city}"]
          fillers:                          # one row per prompt (per template)
            - {city: Dallas, state: Texas, capital: Austin, other_city: Fresno}

* ``.jsonl``: one record per line (``{"id": ..., "prompt": ..., ...}``).
* ``.csv``: a header row naming the columns ``id, prompt, answer, contrast, tags, kind,
  language, logit_targets``; list columns separate their entries with ``;``.

A bare name (``capitals``) is ``conf/prompts/<name>.yaml`` of the repository.

Validation (:class:`PromptSetError`, naming the file, the line and the id of every
problem, all of them at once): unknown fields, a missing or empty prompt, an id that is
missing, duplicated or not ``[A-Za-z0-9_-]+`` (ids name DVC stages and output folders), tags
that are not strings. Whether a prompt fits the model's context is checked when a study
tokenizes it: that prompt fails alone.

The ``conf/prompts`` format is checked against the pipeline's schema, which has no
``contrast`` field: there a contrast prompt is the tag ``contrast=<prompt>``.

Sets generated from the organism world (``capitals``) are :mod:`pipeline.run.prompt_generators`;
the template expansion stays here because the ``generate:`` format is defined by it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import yaml

from pipeline.run.config import PROMPT_ID, PromptSetSpec

__all__ = [
    "CONF_PROMPTS",
    "PromptRecord",
    "PromptSet",
    "PromptSetError",
    "expand_templates",
    "load_prompt_set",
    "logit_targets",
    "prompt_set_from_records",
    "prompt_set_from_spec",
    "to_conf_yaml",
]

#: Where bare prompt-set names are looked up (the ``prompts`` config group).
CONF_PROMPTS = Path(__file__).resolve().parents[2] / "conf" / "prompts"

_FIELDS = ("id", "prompt", "answer", "contrast", "tags", "kind", "language", "logit_targets")
_CONTRAST_TAG = "contrast="


class PromptSetError(ValueError):
    """A prompt set that cannot be used; the message names every offending line and id."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a set.

    answer: the expected next token (None if unknown); contrast: a prompt to compare with
    (e.g. the same template with a city of another state); tags: ``key=value`` strings that
    reports and aggregation group by; logit_targets: attribute from these tokens instead of
    the top logits (``"A,B"``: the difference of the logits of A and B).
    where: ``file:line`` the record came from (for messages).
    """

    id: str
    prompt: str
    answer: str | None = None
    contrast: str | None = None
    tags: tuple[str, ...] = ()
    kind: str = ""
    language: str = ""
    logit_targets: tuple[str, ...] = ()
    where: str = field(default="", compare=False)

    def tag(self, key: str) -> str | None:
        """The value of tag ``key=value`` (the first one), or None."""
        prefix = f"{key}="
        for t in self.tags:
            if t.startswith(prefix):
                return t[len(prefix) :]
        return None

    def tag_dict(self) -> dict[str, str]:
        """Every ``key=value`` tag as a dict (first value of a repeated key wins)."""
        out: dict[str, str] = {}
        for t in self.tags:
            if "=" in t:
                k, v = t.split("=", 1)
                out.setdefault(k, v)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "prompt": self.prompt}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.contrast is not None:
            d["contrast"] = self.contrast
        if self.tags:
            d["tags"] = list(self.tags)
        if self.kind:
            d["kind"] = self.kind
        if self.language:
            d["language"] = self.language
        if self.logit_targets:
            d["logit_targets"] = list(self.logit_targets)
        return d


@dataclass
class PromptSet:
    """An ordered, validated prompt set. ``source``: the file it was read from, if any."""

    name: str
    records: list[PromptRecord]
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def __getitem__(self, prompt_id: str) -> PromptRecord:
        for r in self.records:
            if r.id == prompt_id:
                return r
        raise KeyError(f"prompt set {self.name!r} has no prompt {prompt_id!r}")

    def subset(self, ids: Iterable[str]) -> PromptSet:
        """The prompts with these ids, in set order; an unknown id is an error."""
        wanted = list(ids)
        unknown = sorted(set(wanted) - set(self.ids))
        if unknown:
            raise PromptSetError(f"prompt set {self.name!r} has no prompt(s) {unknown}")
        keep = set(wanted)
        return PromptSet(self.name, [r for r in self.records if r.id in keep], self.source)


# --------------------------------------------------------------------------------- validation
def _problem_where(rec: Mapping[str, Any] | PromptRecord, where: str) -> str:
    pid = rec.id if isinstance(rec, PromptRecord) else rec.get("id")
    return f"{where}" + (f" (id {pid!r})" if pid not in (None, "") else "")


def _str_list(value: Any, what: str, problems: list[str], where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        problems.append(f"{where}: {what} must be a list of strings, got {value!r}")
        return ()
    return tuple(str(v) for v in value)


def _optional_str(value: Any, what: str, problems: list[str], where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(f"{where}: {what} must be a string, got {value!r}")
    return None


def _record(raw: Any, where: str, problems: list[str]) -> PromptRecord | None:
    """A record from a parsed mapping, appending every problem found to ``problems``."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: a prompt record must be a mapping, got {raw!r}")
        return None
    here = _problem_where(raw, where)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        problems.append(f"{here}: unknown field(s) {unknown}; known: {list(_FIELDS)}")
    pid = raw.get("id")
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        problems.append(f"{where}: missing id")
        pid = ""
    pid = str(pid)
    if pid and not PROMPT_ID.match(pid):
        problems.append(f"{here}: id {pid!r} must match {PROMPT_ID.pattern} (it names output folders)")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str):
        problems.append(f"{here}: missing prompt" if prompt is None else f"{here}: prompt must be a string")
        prompt = ""
    elif not prompt.strip():
        problems.append(f"{here}: the prompt is empty")
    tags = _str_list(raw.get("tags"), "tags", problems, here)
    contrast = _optional_str(raw.get("contrast"), "contrast", problems, here)
    if contrast is not None and not contrast.strip():
        problems.append(f"{here}: the contrast prompt is empty (leave it out instead)")
    if contrast is None:  # the conf/prompts spelling: a tag (it becomes the field, not a tag)
        for t in tags:
            if t.startswith(_CONTRAST_TAG):
                contrast = t[len(_CONTRAST_TAG) :]
                tags = tuple(x for x in tags if x != t)
                break
    return PromptRecord(
        id=pid,
        prompt=prompt,
        answer=_optional_str(raw.get("answer"), "answer", problems, here),
        contrast=contrast,
        tags=tags,
        kind=_optional_str(raw.get("kind"), "kind", problems, here) or "",
        language=_optional_str(raw.get("language"), "language", problems, here) or "",
        logit_targets=_str_list(raw.get("logit_targets"), "logit_targets", problems, here),
        where=where,
    )


def _check_ids(records: list[PromptRecord], problems: list[str]) -> None:
    first: dict[str, str] = {}
    for r in records:
        if not r.id:
            continue
        if r.id in first:
            problems.append(f"{r.where}: duplicate id {r.id!r} (first at {first[r.id]})")
        else:
            first[r.id] = r.where


def _raise(problems: list[str], name: str) -> None:
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PromptSetError(f"prompt set {name!r} has {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def prompt_set_from_records(
    records: Iterable[Mapping[str, Any] | PromptRecord], name: str, *, source: str = ""
) -> PromptSet:
    """Validate records (mappings or :class:`PromptRecord`) into a :class:`PromptSet`."""
    problems: list[str] = []
    out: list[PromptRecord] = []
    for i, raw in enumerate(records):
        rec = _record_of(raw, f"{source or name}[{i}]", problems)
        if rec is not None:
            out.append(rec)
    _check_ids(out, problems)
    _raise(problems, name)
    return PromptSet(name, out, source)


def prompt_set_from_spec(spec: PromptSetSpec, *, source: str = "") -> PromptSet:
    """A ``conf/prompts`` set as Hydra composed it into the schema. Its experiments are the
    intervene stage's, not a study's; a contrast prompt is a ``contrast=`` tag there."""
    records = [
        {
            "id": pid,
            "prompt": item.prompt,
            "answer": item.answer,
            "tags": list(item.tags),
            "kind": item.kind,
            "language": item.language,
            "logit_targets": list(item.logit_targets),
        }
        for pid, item in spec.items.items()
    ]
    return prompt_set_from_records(records, spec.name, source=source)


def _record_of(raw: Any, default_where: str, problems: list[str]) -> PromptRecord | None:
    """Validate a parsed mapping or an already built record (e.g. from the generator)."""
    where = getattr(raw, "where", "") or default_where
    if isinstance(raw, PromptRecord):
        raw = raw.to_dict()
    return _record(raw, where, problems)


# ------------------------------------------------------------------------------- YAML with lines
class _Lined(dict):
    """A mapping from YAML that remembers where it started (``where``: ``file:line``)."""

    where: str = ""


def _yaml_loader(source: str):
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Lined:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                # PyYAML keeps the last value silently; a duplicate prompt id must not vanish
                raise PromptSetError(f"{source}:{line}: duplicate key {key!r} (first at {source}:{seen[key]})")
            seen[key] = line
        d = _Lined(loader.construct_mapping(node, deep=True))
        d.where = f"{source}:{node.start_mark.line + 1}"
        return d

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_yaml_loader(source))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PromptSetError(f"{source}: not valid YAML: {exc}") from None


def _records_from_yaml(doc: Any, source: str) -> tuple[str | None, list[Any]]:
    if isinstance(doc, list):
        return None, doc
    if not isinstance(doc, Mapping):
        raise PromptSetError(f"{source}: expected a mapping (name + items/prompts/generate) or a list of records")
    keys = {"items", "prompts", "generate"} & set(doc)
    if len(keys) != 1:
        raise PromptSetError(f"{source}: give exactly one of items:, prompts: or generate: (found {sorted(keys)})")
    extra = sorted(set(doc) - {"name", "items", "prompts", "generate", "description"})
    if extra:
        raise PromptSetError(f"{source}: unknown top-level key(s) {extra}")
    name = doc.get("name")
    (key,) = keys
    if key == "items":
        items = doc["items"]
        if not isinstance(items, Mapping):
            raise PromptSetError(f"{source}: items must map prompt ids to prompts")
        records = []
        for pid, rec in items.items():
            if not isinstance(rec, Mapping):
                raise PromptSetError(f"{source}: items.{pid} must be a mapping with a prompt")
            if "id" in rec and str(rec["id"]) != str(pid):
                raise PromptSetError(f"{getattr(rec, 'where', source)}: items.{pid} has a different id {rec['id']!r}")
            r = _Lined({"id": pid, **rec})
            r.where = getattr(rec, "where", source)
            records.append(r)
        return name, records
    if key == "prompts":
        if not isinstance(doc["prompts"], list):
            raise PromptSetError(f"{source}: prompts must be a list of records")
        return name, doc["prompts"]
    gen = doc["generate"]
    if not isinstance(gen, Mapping):
        raise PromptSetError(f"{source}: generate must be a mapping (templates, fillers, id, ...)")
    allowed = {
        "templates",
        "template",
        "fillers",
        "id",
        "answer",
        "contrast",
        "tags",
        "kind",
        "language",
        "logit_targets",
    }
    extra = sorted(set(gen) - allowed)
    if extra:
        raise PromptSetError(f"{getattr(gen, 'where', source)}: unknown generate key(s) {extra}")
    templates = gen.get("templates", gen.get("template"))
    if isinstance(templates, str):
        templates = [templates]
    try:
        recs = expand_templates(
            templates,
            gen.get("fillers"),
            id=gen.get("id"),
            answer=gen.get("answer"),
            contrast=gen.get("contrast"),
            tags=gen.get("tags", ()),
            kind=gen.get("kind", ""),
            language=gen.get("language", ""),
            logit_targets=gen.get("logit_targets", ()),
        )
    except PromptSetError as exc:
        raise PromptSetError(f"{getattr(gen, 'where', source)}: {exc}") from None
    return name, recs


# ---------------------------------------------------------------------------------- other formats
def _records_from_jsonl(text: str, source: str) -> list[Any]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{source}:{n}: not valid JSON: {exc.msg}") from None
        if isinstance(raw, dict):
            raw = _Lined(raw)
            raw.where = f"{source}:{n}"
        out.append(raw)
    return out


def _records_from_csv(text: str, source: str) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise PromptSetError(f"{source}: empty CSV (expected a header row: id,prompt,answer,...)")
    unknown = sorted(set(reader.fieldnames) - set(_FIELDS))
    if unknown:
        raise PromptSetError(f"{source}:1: unknown column(s) {unknown}; known: {list(_FIELDS)}")
    out = []
    for row in reader:
        rec = _Lined()
        for k, v in row.items():
            if k is None:  # more cells than header columns
                raise PromptSetError(f"{source}:{reader.line_num}: more cells than header columns")
            if v is None or v == "":
                if k in ("prompt", "id"):
                    rec[k] = v or ""
                continue
            rec[k] = [s.strip() for s in v.split(";") if s.strip()] if k in ("tags", "logit_targets") else v
        rec.where = f"{source}:{reader.line_num}"
        out.append(rec)
    return out


def _resolve(source: str | os.PathLike, conf_dir: str | os.PathLike | None) -> Path:
    path = Path(source)
    if path.suffix or os.sep in str(source) or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"prompt set file {path} not found")
        return path
    candidate = Path(conf_dir or CONF_PROMPTS) / f"{source}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in Path(conf_dir or CONF_PROMPTS).glob("*.yaml"))
        raise FileNotFoundError(
            f"no prompt set named {str(source)!r} (conf/prompts has {known}); or give a .yaml/.jsonl/.csv file"
        )
    return candidate


def load_prompt_set(source: str | os.PathLike, *, conf_dir: str | os.PathLike | None = None) -> PromptSet:
    """Read and validate a prompt set: a file (.yaml/.yml/.jsonl/.csv) or a conf/prompts name."""
    path = _resolve(source, conf_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}): save the prompt file as UTF-8"
        ) from None
    where = str(path)
    suffix = path.suffix.lower()
    name = None
    if suffix in (".yaml", ".yml"):
        name, raws = _records_from_yaml(_load_yaml(text, where), where)
    elif suffix == ".jsonl":
        raws = _records_from_jsonl(text, where)
    elif suffix == ".csv":
        raws = _records_from_csv(text, where)
    else:
        raise PromptSetError(f"{where}: unknown prompt set format {suffix!r} (use .yaml, .jsonl or .csv)")
    name = str(name) if name else path.stem
    problems: list[str] = []
    records = []
    for i, raw in enumerate(raws):
        rec = _record_of(raw, f"{where}[{i}]", problems)
        if rec is not None:
            records.append(rec)
    _check_ids(records, problems)
    if not records and not problems:
        problems.append(f"{where}: no prompts")
    _raise(problems, name)
    return PromptSet(name, records, where)


def logit_targets(specs: Sequence[str] | None) -> list | None:
    """A record's ``logit_targets`` as ``attribute()`` takes them: ``"A"`` is the token A,
    ``"A,B"`` the difference of the logits of A and B; none: None (the top logits)."""
    if not specs:
        return None
    return [tuple(s.split(",", 1)) if "," in s else s for s in specs]


# ------------------------------------------------------------------------------------ generator
def _fields_of(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


@overload
def _fill(template: str, row: Mapping[str, Any], what: str) -> str: ...
@overload
def _fill(template: str | None, row: Mapping[str, Any], what: str) -> str | None: ...
def _fill(template: str | None, row: Mapping[str, Any], what: str) -> str | None:
    if template is None:
        return None
    missing = sorted(_fields_of(template) - set(row))
    if missing:
        raise PromptSetError(f"{what} template {template!r} needs filler(s) {missing} that row {dict(row)!r} lacks")
    return template.format(**row)


def expand_templates(
    templates: Sequence[str] | str,
    fillers: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | None,
    *,
    id: str | None = None,  # noqa: A002 - the record field's name
    answer: str | None = None,
    contrast: str | None = None,
    tags: Sequence[str] = (),
    kind: str = "",
    language: str = "",
    logit_targets: Sequence[str] = (),
) -> list[PromptRecord]:
    """Prompts for every template × filler row, in that order (template-major).

    fillers: a list of rows (``{name: value}``), or a mapping ``{name: [values]}`` whose
    cross product gives the rows. ``id``, ``answer``, ``contrast``, every tag and logit
    target are templates over the same names plus ``{template}`` (the template's index);
    ``id`` defaults to ``p{template}_{row}``. Every record gets the tag ``template=<i>``.
    """
    if isinstance(templates, str):
        templates = [templates]
    if not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        raise PromptSetError(f"templates must be a non-empty list of non-empty strings, got {templates!r}")
    if isinstance(fillers, Mapping):
        names = list(fillers)
        rows: list[dict[str, Any]] = [{}]
        for n in names:
            column = fillers[n]
            if isinstance(column, (str, bytes)) or not isinstance(column, Sequence) or not column:
                raise PromptSetError(f"filler {n!r} must be a non-empty list of values")
            rows = [{**r, n: v} for r in rows for v in column]
    elif isinstance(fillers, Sequence) and not isinstance(fillers, (str, bytes)) and fillers:
        rows = []
        for r in fillers:
            if not isinstance(r, Mapping):
                raise PromptSetError(f"each filler row must be a mapping, got {r!r}")
            rows.append(dict(r))
    else:
        raise PromptSetError("fillers must be a non-empty list of rows or a mapping of value lists")
    out = []
    for ti, template in enumerate(templates):
        for ri, row in enumerate(rows):
            values = {**row, "template": ti}
            pid = _fill(id, values, "id") if id is not None else f"p{ti}_{ri}"
            rec_tags = tuple(_fill(t, values, "tag") for t in tags) + (f"template={ti}",)
            out.append(
                PromptRecord(
                    id=str(pid),
                    prompt=_fill(template, values, "prompt"),
                    answer=_fill(answer, values, "answer"),
                    contrast=_fill(contrast, values, "contrast"),
                    tags=tuple(t for t in rec_tags if t is not None),
                    kind=_fill(kind, values, "kind") or "",
                    language=_fill(language, values, "language") or "",
                    logit_targets=tuple(_fill(t, values, "logit target") for t in logit_targets),
                    where=f"template {ti} × row {ri}",
                )
            )
    return out


# ------------------------------------------------------------------------------------- writing
def to_conf_yaml(prompt_set: PromptSet, header: str = "") -> str:
    """The set in the ``conf/prompts`` format (``name`` + ``items``), which the pipeline's
    schema checks: the contrast prompt becomes the tag ``contrast=<prompt>``."""
    items: dict[str, Any] = {}
    for r in prompt_set:
        d = r.to_dict()
        d.pop("id")
        contrast = d.pop("contrast", None)
        if contrast is not None:
            d["tags"] = [*d.get("tags", []), f"{_CONTRAST_TAG}{contrast}"]
        items[r.id] = d
    body = yaml.safe_dump(
        {"name": prompt_set.name, "items": items},
        sort_keys=False,
        allow_unicode=True,
        width=120,
        default_flow_style=None,
    )
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    return "\n".join(lines + [body.rstrip()]) + "\n"
