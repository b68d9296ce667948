"""SBoRAConfig: validation at construction, JSON round trip, PEFT-style target matching."""

from __future__ import annotations

import dataclasses

import pytest

from sbora_reg.errors import ConfigError
from sbora_reg.sbora import SBoRAConfig


def test_json_round_trip_and_scale() -> None:
    cfg = SBoRAConfig(
        variant="fb", r=16, alpha=32, target_modules=["q_proj", "v_proj"], dropout=0.05, seed=7
    )
    assert SBoRAConfig.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.scale == 2.0
    regex = SBoRAConfig(target_modules=r".*\.(q|v)_proj")
    assert SBoRAConfig.from_dict(regex.to_dict()) == regex


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SBoRAConfig().r = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variant": "fc"},
        {"variant": "lora"},
        {"r": 0},
        {"r": 2.5},
        {"r": True},
        {"alpha": float("nan")},
        {"alpha": 0},
        {"alpha": "16"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"seed": "0"},
        {"target_modules": []},
        {"target_modules": ""},
        {"target_modules": ["q_proj", ""]},
        {"target_modules": "(unclosed"},
        {"target_modules": None},
    ],
)
def test_invalid_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as exc:
        SBoRAConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_from_dict_refuses_unknown_keys_and_bad_json() -> None:
    with pytest.raises(ConfigError, match="lora_alpha"):
        SBoRAConfig.from_dict({"r": 4, "lora_alpha": 8})
    with pytest.raises(ConfigError, match="not valid JSON"):
        SBoRAConfig.from_json("{r: 4")
    with pytest.raises(ConfigError, match="JSON object"):
        SBoRAConfig.from_dict([1, 2])


@pytest.mark.parametrize(
    ("targets", "name", "expected"),
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], "q_proj", True),
        (["q_proj"], "model.layers.0.self_attn.xq_proj", False),
        (["self_attn.q_proj"], "model.layers.3.self_attn.q_proj", True),
        (["layers.1.mlp.up_proj"], "model.layers.11.mlp.up_proj", False),
        (r".*layers\.1\.mlp\.up_proj", "model.layers.1.mlp.up_proj", True),
        (r".*layers\.1\.mlp\.up_proj", "model.layers.1.mlp.up_proj.base", False),  # full match
        (r"up_proj", "model.layers.1.mlp.up_proj", False),
    ],
)
def test_target_matching(targets, name: str, expected: bool) -> None:
    assert SBoRAConfig(target_modules=targets).matches(name) is expected
