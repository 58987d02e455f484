import json

import pytest

from llm_modules.config import ModuleConfig, PromptConfig


def test_json_round_trip_with_prompt_block(tmp_path):
    c = ModuleConfig(large_model="L", attention="reference", prompt=PromptConfig("chat_template", "Be brief.", "all"))
    c.save(tmp_path / "c.json")
    back = ModuleConfig.load(tmp_path / "c.json")
    assert back == c and back.reference_compat and not back.causal
    assert json.loads((tmp_path / "c.json").read_text())["prompt"]["format"] == "chat_template"


def test_a_version_0_1_config_loads_with_its_settings_converted(tmp_path):
    """0.1 kept prompt settings in free-form `extra` and attention in two booleans."""
    old = {"large_model": "L", "causal": True, "reference_compat": False, "num_heads": 4,
           "extra": {"format": "paper", "system_prompt": "Answer briefly.", "loss_on": "assistant", "converted_from": "x.pth"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    c = ModuleConfig.load(tmp_path / "old.json")
    assert c.attention == "causal" and c.prompt == PromptConfig("paper", "Answer briefly.", "assistant")
    assert c.notes == {"converted_from": "x.pth"}
    ref = ModuleConfig.from_dict({"large_model": "L", "causal": False, "reference_compat": True})
    assert ref.attention == "reference"


@pytest.mark.parametrize("d,msg", [
    ({"attention": "sideways"}, "attention must be one of causal, reference"),
    ({"prompt": {"format": "markdown"}}, "format must be one of paper, chat_template, plain"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"head_size": 3}, "unknown ModuleConfig field"),
])
def test_bad_configs_name_the_field(tmp_path, d, msg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"c.json: {msg}"):
        ModuleConfig.load(p)
