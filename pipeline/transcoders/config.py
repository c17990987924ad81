"""``config.yaml`` of a transcoder directory: parsing, validation and the error types.

The keys are the ones circuit-tracer reads from transcoder repos on the Hugging Face Hub::

    model_kind: transcoder_set | cross_layer_transcoder      (required)
    feature_input_hook: ln2.hook_normalized                   (required, TL2 name relative to a block)
    feature_output_hook: hook_mlp_out                         (required)
    transcoders: [layer_0.safetensors, hf://org/repo/l1.npz]  (PLT only, optional: one file per layer;
                                                               default layer_{i}.safetensors)
    scan: gemma-2-2b                                          (optional, Neuronpedia scan name)
    model_name: google/gemma-2-2b                             (optional)
    activation: relu | jump_relu | topk                       (optional; default: JumpReLU when a
                                                               threshold is stored, else ReLU)
    k: 64                                                     (required when activation is topk)

Unknown keys are kept in ``TranscoderConfig.extra`` and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: TransformerLens-2 block-relative hook names a transcoder may read from or write to.
SUPPORTED_HOOKS: frozenset[str] = frozenset(
    {
        "ln2.hook_normalized",
        "hook_resid_mid",
        "mlp.hook_in",
        "hook_mlp_in",
        "mlp.hook_out",
        "hook_mlp_out",
        "ln2.hook_out",
        "hook_resid_pre",
        "hook_resid_post",
    }
)

MODEL_KINDS: tuple[str, ...] = ("transcoder_set", "cross_layer_transcoder")
ACTIVATIONS: tuple[str, ...] = ("relu", "jump_relu", "topk")
_ACTIVATION_ALIASES = {"jumprelu": "jump_relu", "jump-relu": "jump_relu", "top_k": "topk"}
REQUIRED_KEYS: tuple[str, ...] = ("model_kind", "feature_input_hook", "feature_output_hook")
CONFIG_NAME = "config.yaml"


class TranscoderConfigError(ValueError):
    """A transcoder directory, its config.yaml or its weight files are unusable."""


class TranscoderFileNotFoundError(TranscoderConfigError, FileNotFoundError):
    """A file the transcoder config needs does not exist."""


def require_directory(directory: Path) -> None:
    """Raise TranscoderFileNotFoundError unless the local transcoder directory exists."""
    if not directory.exists():
        raise TranscoderFileNotFoundError(
            f"transcoder directory {str(directory)!r} does not exist; pass a directory holding "
            "config.yaml or a Hugging Face repo id"
        )
    if not directory.is_dir():
        raise TranscoderFileNotFoundError(
            f"{str(directory)!r} is a file; pass the directory that holds config.yaml and the weight files"
        )


class TranscoderSourceError(TranscoderConfigError, FileNotFoundError):
    """A Hugging Face source could not be fetched (offline and not cached, unreachable, ...)."""


@dataclass
class TranscoderConfig:
    """The parsed ``config.yaml``. ``directory`` is where relative file references resolve."""

    model_kind: str
    feature_input_hook: str
    feature_output_hook: str
    directory: Path
    transcoders: list[str] | None = None
    scan: str | None = None
    model_name: str | None = None
    activation: str | None = None
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The config as written to config.yaml (no ``directory``), for digests and writers."""
        out: dict[str, Any] = {
            "model_kind": self.model_kind,
            "feature_input_hook": self.feature_input_hook,
            "feature_output_hook": self.feature_output_hook,
        }
        for key in ("transcoders", "scan", "model_name", "activation", "k"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


def validate_hook(name: Any, key: str, where: str) -> str:
    """Check one hook name against SUPPORTED_HOOKS; return it."""
    if not isinstance(name, str) or name not in SUPPORTED_HOOKS:
        raise TranscoderConfigError(
            f"{where}: {key} {name!r} is not a supported hook; use one of "
            f"{', '.join(sorted(SUPPORTED_HOOKS))} (TransformerLens-2 names relative to a block)"
        )
    return name


def normalize_activation(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = _ACTIVATION_ALIASES.get(str(value).lower(), str(value).lower())
    if name not in ACTIVATIONS:
        raise TranscoderConfigError(
            f"{where}: activation {value!r} is unknown; use one of {', '.join(ACTIVATIONS)} or leave it out"
        )
    return name


def parse_config_dict(raw: Any, directory: Path, where: str) -> TranscoderConfig:
    """Validate a loaded config mapping; ``where`` names the file in error messages."""
    if not isinstance(raw, dict):
        raise TranscoderConfigError(f"{where} does not hold a YAML mapping; write keys {', '.join(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in raw or raw[key] is None:
            raise TranscoderConfigError(
                f"{where} is missing the key {key!r}; add it (required keys: {', '.join(REQUIRED_KEYS)})"
            )
    kind = raw["model_kind"]
    if kind not in MODEL_KINDS:
        raise TranscoderConfigError(
            f"{where}: unknown model_kind {kind!r}; use 'transcoder_set' (per-layer) or 'cross_layer_transcoder'"
        )
    hook_in = validate_hook(raw["feature_input_hook"], "feature_input_hook", where)
    hook_out = validate_hook(raw["feature_output_hook"], "feature_output_hook", where)

    files = raw.get("transcoders")
    if files is not None:
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise TranscoderConfigError(
                f"{where}: 'transcoders' must be a non-empty list of file paths or hf:// URIs, one per layer"
            )
        if kind == "cross_layer_transcoder":
            raise TranscoderConfigError(
                f"{where}: 'transcoders' is not supported for a cross_layer_transcoder; store "
                "W_enc_{i}.safetensors and W_dec_{i}.safetensors next to config.yaml and drop "
                "the key"
            )

    activation = normalize_activation(raw.get("activation"), where)
    k = raw.get("k")
    if activation == "topk":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TranscoderConfigError(
                f"{where}: activation 'topk' needs a positive integer 'k' (got {k!r}); add k: <int>"
            )
    elif k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise TranscoderConfigError(f"{where}: 'k' must be a positive integer, got {k!r}")

    scan = raw.get("scan")
    if scan is not None and not isinstance(scan, str):
        # circuit-tracer allows a list of scans; we keep the first for graph metadata.
        if isinstance(scan, list) and scan and all(isinstance(s, str) for s in scan):
            scan = scan[0]
        else:
            raise TranscoderConfigError(f"{where}: 'scan' must be a string, got {scan!r}")
    model_name = raw.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise TranscoderConfigError(f"{where}: 'model_name' must be a string, got {model_name!r}")

    known = set(REQUIRED_KEYS) | {"transcoders", "scan", "model_name", "activation", "k"}
    return TranscoderConfig(
        model_kind=kind,
        feature_input_hook=hook_in,
        feature_output_hook=hook_out,
        directory=directory,
        transcoders=list(files) if files is not None else None,
        scan=scan,
        model_name=model_name,
        activation=activation,
        k=k,
        extra={key: value for key, value in raw.items() if key not in known},
    )


def read_config(directory: str | Path) -> TranscoderConfig:
    """Read and validate ``directory/config.yaml``."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    require_directory(directory)
    if not path.is_file():
        raise TranscoderFileNotFoundError(
            f"{str(path)!r} not found; a transcoder directory needs a config.yaml with keys {', '.join(REQUIRED_KEYS)}"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TranscoderConfigError(f"{str(path)!r} is not valid YAML ({first}); fix the file") from exc
    return parse_config_dict(raw, directory, repr(str(path)))


def dump_config(config: dict[str, Any]) -> str:
    """Deterministic YAML text for a config mapping (keys in a fixed order)."""
    order = [
        "model_name",
        "model_kind",
        "feature_input_hook",
        "feature_output_hook",
        "scan",
        "activation",
        "k",
        "transcoders",
    ]
    ordered = {key: config[key] for key in order if config.get(key) is not None}
    for key in sorted(config):
        if key not in ordered and config[key] is not None:
            ordered[key] = config[key]
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)
