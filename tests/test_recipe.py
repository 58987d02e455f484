import pytest

from llm_modules.training import TrainConfig, parse_overrides, train


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown key\\(s\\): lr_bridg"):
        TrainConfig.from_dict({"lr_bridg": 1})
    p = tmp_path / "r.yaml"
    p.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="r.yaml: not valid YAML"):
        TrainConfig.from_yaml(p)
    assert parse_overrides(["--lr-bridge", "0.001", "--epochs=2", "--causal", "false"]) == {
        "lr_bridge": 1e-3, "epochs": 2, "causal": False}
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainConfig(output_dir=str(tmp_path / "none")), resume=True)
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such recipe file"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml")


def test_numbers_are_coerced_and_wrong_types_named():
    need = {"large_model": "some/model", "data": "d.jsonl"}
    c = TrainConfig.from_dict({**need, "lr_bridge": "1e-3", "epochs": "4", "num_heads": "2"})
    assert c.lr_bridge == 1e-3 and c.epochs == 4 and c.module.num_heads == 2
    with pytest.raises(ValueError, match="key 'epochs' must be int, got 'many'"):
        TrainConfig.from_dict({**need, "epochs": "many"})
    with pytest.raises(ValueError, match="key 'causal' must be bool"):
        TrainConfig.from_dict({**need, "causal": "maybe"})
    with pytest.raises(ValueError, match="config: large_model is required"):
        TrainConfig.from_dict({"data": "d.jsonl"})  # no library default names a test fixture


def test_recipe_keys_route_to_the_module_and_round_trip():
    """Module keys are declared once (ModuleConfig); old keys (causal) still read; to_recipe inverts from_dict."""
    d = {"large_model": "L", "small_model": "S", "data": "d.jsonl", "causal": False, "format": "chat_template",
         "system_prompt": "Be brief.", "loss_on": "all", "adapter_dim": 32, "epochs": 3}
    c = TrainConfig.from_dict(d)
    assert c.module.attention == "reference" and c.module.adapter_dim == 32
    assert (c.module.prompt.format, c.module.prompt.system_prompt, c.module.prompt.loss_on) == ("chat_template", "Be brief.", "all")
    again = TrainConfig.from_dict(c.to_recipe())
    assert again == c
    with pytest.raises(ValueError, match="format must be one of paper, chat_template, plain; got 'markdown'"):
        TrainConfig.from_dict({**d, "format": "markdown"})


def test_the_module_field_names_every_module_key_a_recipe_may_set():
    """The docstring users read for the recipe's module keys lists all of them (it once missed five)."""
    import ast
    import inspect

    from llm_modules.config import MODULE_KEYS, PROMPT_KEYS
    from llm_modules.training import recipe

    tree = ast.parse(inspect.getsource(recipe.TrainConfig))
    body = tree.body[0].body
    doc = next(body[i + 1].value.value for i, n in enumerate(body)
               if isinstance(n, ast.AnnAssign) and n.target.id == "module")
    missing = [k for k in (*MODULE_KEYS, *PROMPT_KEYS) if k not in doc]
    assert not missing, f"TrainConfig.module's docstring misses {missing}"
