"""Where transcoders come from: a local directory or a Hugging Face repo (optionally a subfolder).

Accepted sources:

* an existing local directory holding ``config.yaml`` (no network is ever touched, unless its
  config references ``hf://`` files);
* ``org/repo``, ``org/repo//sub/folder``, ``org/repo/sub/folder`` (circuit-tracer's form),
  each optionally prefixed ``hf://`` and suffixed ``@revision``.

Hub access goes only through ``huggingface_hub.snapshot_download(allow_patterns=...)``:
first ``config.yaml``, then exactly the weight files it needs. ``HF_HUB_OFFLINE`` (and
``HF_HOME`` / ``HF_HUB_CACHE``) are read when the call happens, so a cached snapshot loads
offline and a missing one fails with a one-line ``TranscoderSourceError``.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from huggingface_hub import snapshot_download

from .config import (
    CONFIG_NAME,
    TranscoderConfig,
    TranscoderFileNotFoundError,
    TranscoderSourceError,
    require_directory,
)

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        """circuit-tracer's scan name for a hub source: repo[//subfolder][@revision]."""
        out = self.repo_id if not self.subfolder else f"{self.repo_id}//{self.subfolder}"
        return f"{out}@{self.revision}" if self.revision else out


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", ".")) or "\\" in source or (len(source) > 1 and source[1] == ":")


def parse_hub_ref(source: str, *, revision: str | None = None, subfolder: str | None = None) -> HubRef:
    """Parse a hub source string; explicit ``revision``/``subfolder`` arguments win."""
    ref = source.strip()
    if ref.startswith("hf://"):
        ref = ref[len("hf://") :]
    if "@" in ref:
        ref, rev = ref.rsplit("@", 1)
        revision = revision or rev or None
    sub: str | None
    if "//" in ref:
        repo, sub = ref.split("//", 1)
    else:
        parts = ref.split("/")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    repo = repo.strip("/")
    sub = sub.strip("/") or None
    if subfolder:
        sub = subfolder.strip("/") if not sub else f"{sub}/{subfolder.strip('/')}"
    if not _REPO_ID.match(repo):
        raise TranscoderFileNotFoundError(
            f"transcoder source {source!r} is neither an existing directory nor a Hugging Face "
            "repo id ('org/name', 'org/name//subfolder'); pass a local directory holding "
            "config.yaml"
        )
    return HubRef(repo, sub, revision)


def _snapshot(ref: HubRef, patterns: list[str], what: str) -> Path:
    """snapshot_download restricted to ``patterns``; returns the snapshot root."""
    offline = _offline()
    try:
        root = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            allow_patterns=patterns,
            cache_dir=_cache_dir(),
            local_files_only=offline,
        )
    except Exception as exc:  # every failure becomes one actionable line
        if offline:
            reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        else:
            text = " ".join(str(exc).split()) or type(exc).__name__
            reason = f"{type(exc).__name__}: {text[:160]}"
        raise TranscoderSourceError(
            f"could not fetch {what} from Hugging Face repo {ref.describe()!r} ({reason}); "
            "to work offline pass a local directory holding config.yaml instead, e.g. "
            "load_transcoders('/path/to/transcoders')"
        ) from None
    return Path(root)


def fetch_config_dir(ref: HubRef) -> Path:
    """Download (or find cached) ``config.yaml`` of a hub source; return its directory."""
    sub = f"{ref.subfolder}/" if ref.subfolder else ""
    root = _snapshot(ref, [f"{sub}{CONFIG_NAME}"], "the transcoders' config.yaml")
    directory = root / ref.subfolder if ref.subfolder else root
    if not (directory / CONFIG_NAME).is_file():
        raise TranscoderSourceError(
            f"Hugging Face repo {ref.describe()!r} has no {sub}{CONFIG_NAME}; check the repo id "
            "and subfolder, or pass a local directory holding config.yaml"
        )
    return directory


def fetch_weight_files(ref: HubRef, config: TranscoderConfig) -> None:
    """Download the weight files ``config`` needs from the repo ``ref`` (same snapshot)."""
    sub = f"{ref.subfolder}/" if ref.subfolder else ""
    if config.model_kind == "cross_layer_transcoder":
        patterns = [f"{sub}W_enc_*.safetensors", f"{sub}W_dec_*.safetensors"]
    elif config.transcoders is None:
        patterns = [f"{sub}layer_*.safetensors"]
    else:
        patterns = [
            f"{sub}{posixpath.normpath(entry)}"
            for entry in config.transcoders
            if not entry.startswith("hf://") and not os.path.isabs(entry)
        ]
    if patterns:
        _snapshot(ref, patterns, "the transcoder weights")


def parse_hf_uri(uri: str) -> HubRef:
    """``hf://org/repo/path/to/file?revision=x`` -> HubRef(repo, subfolder=file path, revision)."""
    parsed = urlparse(uri)
    path = parsed.path.lstrip("/")
    parts = path.split("/", 1)
    if parsed.scheme != "hf" or len(parts) != 2 or not parts[1]:
        raise TranscoderFileNotFoundError(f"invalid hf:// URI {uri!r} in config.yaml; write hf://org/repo/path/to/file")
    revision = parse_qs(parsed.query).get("revision", [None])[0] or None
    return HubRef(f"{parsed.netloc}/{parts[0]}", parts[1], revision)


def resolve_files(entries: list[str], directory: Path) -> list[Path]:
    """``transcoders`` entries -> local paths. hf:// URIs are fetched (one snapshot_download per
    repo and revision); relative paths resolve against the transcoder directory, never the
    working directory."""
    groups: dict[tuple[str, str | None], list[str]] = {}
    parsed: dict[str, HubRef] = {}
    for entry in entries:
        if entry.startswith("hf://"):
            ref = parsed[entry] = parse_hf_uri(entry)
            groups.setdefault((ref.repo_id, ref.revision), []).append(str(ref.subfolder))
    roots = {
        key: _snapshot(HubRef(key[0], None, key[1]), sorted(set(files)), f"{len(set(files))} transcoder file(s)")
        for key, files in groups.items()
    }
    out = []
    for entry in entries:
        if entry in parsed:
            ref = parsed[entry]
            out.append(roots[(ref.repo_id, ref.revision)] / str(ref.subfolder))
            continue
        path = Path(entry).expanduser()
        out.append(path if path.is_absolute() else directory / posixpath.normpath(entry.replace("\\", "/")))
    return out


def resolve_source(
    source: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None
) -> tuple[Path, HubRef | None]:
    """A source -> (local directory holding config.yaml, the hub ref if it came from the hub)."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.exists() or isinstance(source, Path) or looks_local(text):
        if subfolder:
            local = local / subfolder
        require_directory(local)
        return local.absolute(), None
    ref = parse_hub_ref(text, revision=revision, subfolder=subfolder)
    return fetch_config_dir(ref), ref
