"""Resolving what the user typed into a transformers config: zoo names, config.json paths, HF ids.

Nothing here loads weights or touches the network. Zoo entries are data (`dooly_fx.zoo`), paths are
read from disk, and HF ids are looked up only in the local Hugging Face hub cache. Every config is
built with `AutoConfig.for_model(**fields)` exactly as published: nothing that changes the
architecture is ever set on it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig

from dooly_fx.errors import UserError
from dooly_fx.zoo import ZOO, ZooEntry

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""Fields a decoder-LLM capture cannot do without; each must be a positive integer."""

FFN_FIELDS = ("intermediate_size", "moe_intermediate_size")
"""At least one of these must be a positive integer (MoE models may have only the second)."""

OPTIONAL_COUNT_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
"""Fields that may be absent or null, but must be positive integers when given."""

_ACCEPTED = "give a zoo name, a path to a config.json or its folder, or an HF id in the HF cache"
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_BUILD_ERRORS = (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError)


@dataclass(frozen=True)
class ModelSpec:
    """A model the user named, resolved to a transformers config (never to weights)."""

    name: str
    """The zoo name, or the path or HF id the user gave."""
    hf_id: str | None
    """The Hugging Face repository id, where one is known."""
    source: str
    """Where the config came from: "zoo", "path" or "hf-cache"."""
    config: transformers.PretrainedConfig
    """The model's config, as published."""


def zoo_names() -> list[str]:
    """The zoo's model names, in table order."""
    return list(ZOO)


def resolve_model(ref: str) -> ModelSpec:
    """The spec for a zoo name or HF id, a config.json or its folder, or a cached HF id."""
    ref = ref.strip()
    if not ref:
        raise UserError(f"no model given; {_ACCEPTED}")
    entry = _zoo_entry(ref)
    if entry is not None:
        return ModelSpec(entry.name, entry.hf_id, "zoo", _build(entry.fields(), entry.name))
    path = Path(ref).expanduser()
    if path.exists():
        return ModelSpec(ref, None, "path", _config_from_file(_config_file(path)))
    if _HF_ID.fullmatch(ref) and not ref.endswith(".json"):
        cached = _cached_config_file(ref)
        if cached is not None:
            return ModelSpec(ref, ref, "hf-cache", _config_from_file(cached))
    elif _looks_like_path(ref):
        raise UserError(f"no such file or folder: '{ref}'")
    raise UserError(_unknown_model_message(ref))


def spec_from_config(name: str, fields: Mapping[str, Any], where: str) -> ModelSpec:
    """The spec of a config recorded elsewhere (a latency DB keeps each model's config)."""
    return ModelSpec(name, None, where, _build(dict(fields), where))


def validate_config(config: transformers.PretrainedConfig | Mapping[str, Any], where: str) -> None:
    """Raise UserError (naming `where` and the field) unless the config can be captured."""
    get = _field_reader(config)
    for name in REQUIRED_FIELDS:
        value = get(name)
        if value is None:
            raise UserError(f"{where}: missing field '{name}' (a decoder LLM config needs it)")
        _check_positive_int(where, name, value)
    ffn = {name: get(name) for name in FFN_FIELDS}
    if all(value is None for value in ffn.values()):
        raise UserError(
            f"{where}: missing field 'intermediate_size' (or 'moe_intermediate_size' for MoE)"
        )
    optional = {name: get(name) for name in OPTIONAL_COUNT_FIELDS}
    for name, value in {**ffn, **optional}.items():
        if value is not None:
            _check_positive_int(where, name, value)


# ---- zoo -----------------------------------------------------------------------------------


def _zoo_entry(ref: str) -> ZooEntry | None:
    """The zoo entry named `ref` or with HF id `ref` (both case-insensitive), if any."""
    wanted = ref.lower()
    for entry in ZOO.values():
        if wanted in (entry.name, entry.hf_id.lower()):
            return entry
    return None


def _close_matches(ref: str) -> list[str]:
    """Zoo names (or HF ids, when `ref` looks like one) close to `ref`, best first."""
    wanted = ref.lower()
    by_key = {entry.name: entry for entry in ZOO.values()}
    by_key.update({entry.hf_id.lower(): entry for entry in ZOO.values()})
    matches = difflib.get_close_matches(wanted, list(by_key), n=3, cutoff=0.6)
    shown = [by_key[key].hf_id if "/" in wanted else by_key[key].name for key in matches]
    return list(dict.fromkeys(shown))


def _unknown_model_message(ref: str) -> str:
    """One line: what was not found, the closest zoo names, and what else is accepted."""
    accepted = f"{_ACCEPTED} at {_hf_hub_cache()}"
    matches = _close_matches(ref)
    if matches:
        return f"unknown model '{ref}'; did you mean: {', '.join(matches)}? ({accepted})"
    return f"unknown model '{ref}'; zoo names: {', '.join(ZOO)} ({accepted})"


# ---- files and the HF cache ----------------------------------------------------------------


def _looks_like_path(ref: str) -> bool:
    """Whether `ref` was meant as a file system path rather than a name."""
    return ref.endswith(".json") or ref.startswith((".", "~", os.sep)) or os.sep in ref


def _config_file(path: Path) -> Path:
    """`path` itself, or the config.json inside it when it is a folder."""
    if not path.is_dir():
        return path
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path}: folder has no config.json")
    return config


def _hf_hub_cache() -> Path:
    """The local HF hub cache folder, chosen as huggingface_hub does (read now, not at import)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def _cached_repo(hf_id: str) -> Path | None:
    """The cache folder `models--org--name` of `hf_id` (matched case-insensitively), if any."""
    cache = _hf_hub_cache()
    folder = "models--" + hf_id.replace("/", "--")
    if (cache / folder).is_dir():
        return cache / folder
    if not cache.is_dir():
        return None
    wanted = folder.lower()
    return next((p for p in cache.iterdir() if p.name.lower() == wanted and p.is_dir()), None)


def _cached_config_file(hf_id: str) -> Path | None:
    """The cached config.json of `hf_id`: the `main` snapshot if recorded, else the newest one."""
    repo = _cached_repo(hf_id)
    if repo is None:
        return None
    main_ref = repo / "refs" / "main"
    if main_ref.is_file():
        main = repo / "snapshots" / main_ref.read_text(encoding="utf-8").strip() / "config.json"
        if main.is_file():
            return main
    snapshots = [p for p in (repo / "snapshots").glob("*/config.json") if p.is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; UserError naming the file if unreadable or not an object."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{file}: cannot read: {_one_line(str(error))}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{file}: malformed JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object at the top level")
    return data


def _config_from_file(file: Path) -> transformers.PretrainedConfig:
    """The config built from the fields of the config.json `file`."""
    return _build(_read_json_object(file), str(file))


# ---- building and checking configs ---------------------------------------------------------


def _build(fields: dict[str, Any], where: str) -> transformers.PretrainedConfig:
    """Check `fields` and build their config with AutoConfig.for_model; UserError if impossible."""
    model_type = _model_type(fields, where)
    validate_config({**fields, "model_type": model_type}, where)
    kwargs = {key: value for key, value in fields.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except _BUILD_ERRORS as error:
        # The config classes validate their own fields; report that as the user's mistake.
        reason = _one_line(str(error))
        raise UserError(f"{where}: transformers rejects this config: {reason}") from None


def _model_type(fields: Mapping[str, Any], where: str) -> str:
    """The config's `model_type`, inferred from `architectures` if absent; must be known."""
    model_type = fields.get("model_type") or _model_type_of(fields.get("architectures"))
    if not model_type:
        raise UserError(
            f"{where}: missing field 'model_type' (and no known 'architectures' to infer it from)"
        )
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UserError(
            f"{where}: model_type {model_type!r} is not known to "
            f"transformers {transformers.__version__}"
        )
    return model_type


def _model_type_of(architectures: Any) -> str | None:
    """The model_type whose transformers class is named in `architectures`, if any."""
    if not isinstance(architectures, list):
        return None
    from transformers.models.auto import modeling_auto

    owners: dict[str, str] = {}
    tables = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_MAPPING_NAMES)
    for table in tables:
        for model_type, classes in table.items():
            for cls in (classes,) if isinstance(classes, str) else classes:
                owners.setdefault(cls, model_type)
    return next((owners[a] for a in architectures if isinstance(a, str) and a in owners), None)


def _field_reader(
    config: transformers.PretrainedConfig | Mapping[str, Any],
) -> Callable[[str], Any]:
    """A getter for the decoder's fields (None if absent), honouring old field-name aliases."""
    if not isinstance(config, Mapping):
        text = config.get_text_config(decoder=True)
        return lambda name: getattr(text, name, None)
    fields = config
    if not _has_hidden_size(config) and isinstance(config.get("text_config"), Mapping):
        fields = config["text_config"]
    aliases = _attribute_map(fields.get("model_type"))
    return lambda name: fields.get(name, fields.get(aliases.get(name, name)))


def _has_hidden_size(fields: Mapping[str, Any]) -> bool:
    """Whether `fields` names the hidden size, under its own name or its class's alias."""
    alias = _attribute_map(fields.get("model_type")).get("hidden_size", "hidden_size")
    return "hidden_size" in fields or alias in fields


def _attribute_map(model_type: Any) -> dict[str, str]:
    """The config class's map from standard field names to its own (e.g. hidden_size -> n_embd)."""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return {}
    return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}))


def _check_positive_int(where: str, name: str, value: Any) -> None:
    """UserError unless `value` is an int above zero (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: field '{name}' must be a positive integer, got {value!r}")


def _one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, collapsed to one space."""
    return " ".join(text.split())
