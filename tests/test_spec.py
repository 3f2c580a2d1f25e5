"""Tests of the model zoo and of resolving model references into transformers configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dooly_fx.errors import UserError
from dooly_fx.spec import ModelSpec, resolve_model, validate_config, zoo_names
from dooly_fx.zoo import ZOO

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
}


def write_config(folder: Path, fields: dict[str, Any]) -> Path:
    """Write `fields` as folder/config.json and return the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "config.json"
    file.write_text(json.dumps(fields), encoding="utf-8")
    return file


def user_error(ref: str) -> str:
    """The message of the UserError that resolving `ref` raises; it must be one line."""
    with pytest.raises(UserError) as caught:
        resolve_model(ref)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- the zoo -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_entry_builds_its_own_config(name: str) -> None:
    entry = ZOO[name]
    spec = resolve_model(name)
    assert spec == ModelSpec(name, entry.hf_id, "zoo", spec.config)
    assert spec.config.model_type == entry.config["model_type"] == entry.family
    assert spec.config.hidden_size == entry.config["hidden_size"]
    assert spec.config.num_hidden_layers == entry.config["num_hidden_layers"]
    assert spec.config.num_attention_heads == entry.config["num_attention_heads"]
    assert spec.config.vocab_size == entry.config["vocab_size"]


def test_zoo_is_large_and_varied() -> None:
    assert len(ZOO) >= 16
    assert len({entry.family for entry in ZOO.values()}) >= 6
    assert zoo_names() == list(ZOO)
    assert all(name == name.lower() and ZOO[name].name == name for name in ZOO)
    assert len({entry.hf_id.lower() for entry in ZOO.values()}) == len(ZOO)


def test_zoo_entries_are_read_only_and_hand_out_copies() -> None:
    entry = ZOO["llama-3.1-8b"]
    with pytest.raises(TypeError):
        entry.config["hidden_size"] = 1  # type: ignore[index]
    fields = entry.fields()
    fields["rope_scaling"]["factor"] = 1.0
    assert entry.config["rope_scaling"]["factor"] == 8.0


def test_building_a_zoo_config_leaves_the_table_untouched() -> None:
    before = ZOO["llama-3.1-8b"].fields()
    resolve_model("llama-3.1-8b")
    assert ZOO["llama-3.1-8b"].fields() == before


def test_llama_3_1_8b_values() -> None:
    config = resolve_model("llama-3.1-8b").config
    assert (config.hidden_size, config.num_hidden_layers) == (4096, 32)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert (config.vocab_size, config.intermediate_size) == (128256, 14336)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings is False


def test_mistral_7b_is_v0_3() -> None:
    config = resolve_model("mistral-7b").config
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (4096, 14336, 32768)
    assert config.sliding_window is None


def test_qwen2_5_7b_values() -> None:
    config = resolve_model("qwen2.5-7b").config
    assert config.hidden_size == 3584
    assert (config.num_attention_heads, config.num_key_value_heads) == (28, 4)
    assert (config.intermediate_size, config.vocab_size) == (18944, 152064)


def test_mixtral_is_a_top_2_of_8_moe() -> None:
    config = resolve_model("mixtral-8x7b").config
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)


def test_gemma_2_9b_has_windows_and_softcapping() -> None:
    config = resolve_model("gemma-2-9b").config
    assert (config.sliding_window, config.head_dim) == (4096, 256)
    assert config.attn_logit_softcapping == 50.0
    assert config.final_logit_softcapping == 30.0
    assert config.layer_types[:4] == ["sliding_attention", "full_attention"] * 2
    assert len(config.layer_types) == config.num_hidden_layers == 42


def test_command_r7b_makes_every_fourth_layer_global() -> None:
    config = resolve_model("command-r7b").config
    assert config.model_type == "cohere2"
    full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert full == list(range(3, 32, 4))
    assert config.sliding_window == 4096


def test_moe_entries_carry_their_expert_fields() -> None:
    qwen3 = resolve_model("qwen3-30b-a3b").config
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.moe_intermediate_size) == (
        128,
        8,
        768,
    )
    qwen2 = resolve_model("qwen1.5-moe-a2.7b").config
    assert qwen2.model_type == "qwen2_moe"
    assert (qwen2.num_experts, qwen2.num_experts_per_tok) == (60, 4)
    assert qwen2.shared_expert_intermediate_size == 5632


# ---- resolving names -----------------------------------------------------------------------


def test_hf_id_resolves_to_the_zoo_entry() -> None:
    spec = resolve_model("meta-llama/Llama-3.1-8B")
    assert (spec.name, spec.source) == ("llama-3.1-8b", "zoo")
    assert resolve_model("META-LLAMA/llama-3.1-8b").name == "llama-3.1-8b"


def test_zoo_names_are_case_insensitive() -> None:
    spec = resolve_model("Llama-3.1-8B")
    assert (spec.name, spec.hf_id) == ("llama-3.1-8b", "meta-llama/Llama-3.1-8B")


def test_unknown_name_suggests_close_matches_and_other_inputs() -> None:
    message = user_error("llama-3-8b")
    assert message.startswith("unknown model 'llama-3-8b'; did you mean: llama-3.1-8b")
    assert "config.json" in message and "HF cache" in message


def test_unknown_hf_id_suggests_hf_ids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    message = user_error("meta-llama/Llama-3-8B")
    assert "did you mean: meta-llama/Llama-3.1-8B" in message
    assert str(tmp_path) in message


def test_empty_reference() -> None:
    assert user_error("  ").startswith("no model given; give a zoo name")


def test_name_with_no_close_match_lists_the_zoo() -> None:
    message = user_error("zzzz")
    assert "zoo names: " in message and "llama-3.1-8b" in message


# ---- config.json files and folders ---------------------------------------------------------


def test_config_json_file_and_folder(tmp_path: Path) -> None:
    file = write_config(tmp_path / "tiny", TINY_LLAMA)
    for ref in (str(file), str(file.parent)):
        spec = resolve_model(ref)
        assert (spec.name, spec.hf_id, spec.source) == (ref, None, "path")
        assert (spec.config.model_type, spec.config.hidden_size) == ("llama", 64)
        assert spec.config.num_key_value_heads == 2


def test_any_architecture_transformers_knows(tmp_path: Path) -> None:
    fields = {**TINY_LLAMA, "model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"]}
    fields.update(bos_token_id=0, eos_token_id=0)
    config = resolve_model(str(write_config(tmp_path, fields))).config
    assert type(config).__name__ == "Starcoder2Config"
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)


def test_model_type_is_inferred_from_architectures(tmp_path: Path) -> None:
    fields = {key: value for key, value in TINY_LLAMA.items() if key != "model_type"}
    assert resolve_model(str(write_config(tmp_path, fields))).config.model_type == "llama"


def test_moe_config_may_name_only_the_expert_width(tmp_path: Path) -> None:
    fields = {**TINY_LLAMA, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}
    del fields["intermediate_size"]
    fields.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    config = resolve_model(str(write_config(tmp_path, fields))).config
    assert config.moe_intermediate_size == 32


def test_malformed_json_names_the_file_and_position(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text('{"model_type": "llama",\n  "hidden_size": }', encoding="utf-8")
    message = user_error(str(file))
    assert str(file) in message and "malformed JSON" in message
    assert "line 2 column 18" in message


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text("[1, 2]", encoding="utf-8")
    assert "JSON object" in user_error(str(file))


def test_missing_model_type(tmp_path: Path) -> None:
    fields = {key: value for key, value in TINY_LLAMA.items() if key != "model_type"}
    fields["architectures"] = ["NoSuchModelForCausalLM"]
    message = user_error(str(write_config(tmp_path, fields)))
    assert "config.json" in message and "'model_type'" in message


def test_model_type_unknown_to_transformers(tmp_path: Path) -> None:
    message = user_error(str(write_config(tmp_path, {**TINY_LLAMA, "model_type": "llamalike"})))
    assert "config.json" in message and "'llamalike'" in message and "transformers" in message


@pytest.mark.parametrize(
    "field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
)
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    fields = {key: value for key, value in TINY_LLAMA.items() if key != field}
    message = user_error(str(write_config(tmp_path, fields)))
    assert "config.json" in message and f"missing field '{field}'" in message


def test_missing_ffn_width(tmp_path: Path) -> None:
    fields = {key: value for key, value in TINY_LLAMA.items() if key != "intermediate_size"}
    message = user_error(str(write_config(tmp_path, fields)))
    assert "missing field 'intermediate_size'" in message and "moe_intermediate_size" in message


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("hidden_size", -3, "-3"),
        ("num_hidden_layers", 0, "0"),
        ("vocab_size", "1000", "'1000'"),
        ("num_attention_heads", 4.0, "4.0"),
        ("intermediate_size", True, "True"),
        ("num_key_value_heads", -1, "-1"),
    ],
)
def test_field_must_be_a_positive_integer(
    tmp_path: Path, field: str, value: Any, shown: str
) -> None:
    message = user_error(str(write_config(tmp_path, {**TINY_LLAMA, field: value})))
    assert message == (
        f"{tmp_path / 'config.json'}: field '{field}' must be a positive integer, got {shown}"
    )


def test_config_transformers_rejects_is_a_user_error(tmp_path: Path) -> None:
    fields = {**TINY_LLAMA, "hidden_size": 66}  # not a multiple of the 4 heads
    message = user_error(str(write_config(tmp_path, fields)))
    assert "config.json" in message and "transformers rejects" in message


def test_folder_without_config_json(tmp_path: Path) -> None:
    assert "has no config.json" in user_error(str(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    assert "no such file or folder" in user_error(str(tmp_path / "nope" / "config.json"))


# ---- the local HF cache --------------------------------------------------------------------


def fake_snapshot(cache: Path, hf_id: str, revision: str, fields: dict[str, Any]) -> Path:
    """Lay out one snapshot of `hf_id` the way huggingface_hub caches it; return its config.json."""
    repo = cache / ("models--" + hf_id.replace("/", "--"))
    return write_config(repo / "snapshots" / revision, fields)


def test_cached_hf_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_snapshot(tmp_path, "acme/tiny-llama", "abc123", TINY_LLAMA)
    spec = resolve_model("acme/tiny-llama")
    assert spec == ModelSpec("acme/tiny-llama", "acme/tiny-llama", "hf-cache", spec.config)
    assert spec.config.hidden_size == 64


def test_cached_hf_id_prefers_the_main_ref(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cache = tmp_path / "hub"
    fake_snapshot(cache, "acme/tiny-llama", "old", {**TINY_LLAMA, "hidden_size": 32})
    fake_snapshot(cache, "acme/tiny-llama", "new", TINY_LLAMA)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("old", encoding="utf-8")
    assert resolve_model("acme/tiny-llama").config.hidden_size == 32


def test_uncached_hf_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    message = user_error("acme/not-here")
    assert message.startswith("unknown model 'acme/not-here'")
    assert str(tmp_path) in message


# ---- validate_config on built configs ------------------------------------------------------


def test_validate_config_accepts_every_zoo_config() -> None:
    for name in ZOO:
        validate_config(resolve_model(name).config, name)


def test_validate_config_checks_built_configs() -> None:
    config = resolve_model("llama-3.2-1b").config
    config.num_hidden_layers = 0
    with pytest.raises(UserError, match=r"^x: field 'num_hidden_layers' must be a positive"):
        validate_config(config, "x")


def test_validate_config_reads_aliases_and_text_configs() -> None:
    gpt2_like = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}
    validate_config({**gpt2_like, "vocab_size": 100, "intermediate_size": 256}, "x")
    nested = {"model_type": "llava", "text_config": TINY_LLAMA}
    validate_config(nested, "x")
    with pytest.raises(UserError, match="'vocab_size'"):
        validate_config({"text_config": {**TINY_LLAMA, "vocab_size": None}}, "x")
