"""Trainer state without pickle: round trip, and tampered run folders never run code."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from llm_modules.cli import main
from llm_modules.training.checkpoint import (LEGACY_STATE, STATE_JSON, STATE_TENSORS, read_trainer_state, rng_state,
                                             set_rng_state, write_trainer_state)


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_state_round_trip_restores_optimiser_and_rng(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1e-3, "name": "bridge"}])
    p.grad = torch.randn(3, 2)
    opt.step()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    rng = rng_state()
    state = {"optimizer": opt.state_dict(), "scheduler": {"last_epoch": 1, "lr_lambdas": [None]}, "epoch": 0,
             "pos": 3, "step": 1, "best": float("inf"), "rng": [rng], "config": {"lr_bridge": 1e-3}}
    write_trainer_state(tmp_path, state)
    assert json.loads((tmp_path / STATE_JSON).read_text())["pos"] == 3
    back = read_trainer_state(tmp_path)
    assert back["best"] == float("inf") and back["step"] == 1
    opt2 = torch.optim.AdamW([{"params": [torch.nn.Parameter(p.detach().clone())], "lr": 1e-3, "name": "bridge"}])
    opt2.load_state_dict(back["optimizer"])  # int-keyed parameter state survives JSON
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(back["rng"][0])
    assert (torch.rand(2), random.random(), np.random.rand())[1:] == expected[1:]
    set_rng_state(back["rng"][0])
    torch.testing.assert_close(torch.rand(2), expected[0])


def test_pickle_payloads_in_a_run_folder_never_run(tmp_path):
    last = tmp_path / "last"
    last.mkdir()
    marker = tmp_path / "pwned"
    (last / LEGACY_STATE).write_bytes(pickle.dumps(_Payload(marker)))  # what 0.1 would have unpickled
    with pytest.raises(ValueError, match="pickle form .* never loaded"):
        read_trainer_state(last)
    (last / STATE_JSON).write_text(json.dumps({"optimizer": {}, "scheduler": {}, "epoch": 0, "pos": 0, "step": 0,
                                               "rng": [], "config": {}}))
    (last / STATE_TENSORS).write_bytes(pickle.dumps(_Payload(marker)))  # a payload where tensors belong
    with pytest.raises(ValueError, match=f"{STATE_TENSORS}: not a readable safetensors file"):
        read_trainer_state(last)
    (last / STATE_JSON).write_text('{"optimizer": ')  # truncated
    with pytest.raises(ValueError, match=f"{STATE_JSON}: not valid JSON"):
        read_trainer_state(last)
    assert not marker.exists()


def test_resume_from_a_tampered_run_is_one_line_through_the_cli(fx, tmp_path, capsys):
    from conftest import write_tiny_recipe

    recipe, _ = write_tiny_recipe(fx, tmp_path, rows=16, data_seed=2, adapter_dim=8)
    assert main(["train", "--config", str(recipe)]) == 0
    last = tmp_path / "run" / "last"
    assert (last / STATE_JSON).exists() and not (last / LEGACY_STATE).exists()
    marker = tmp_path / "pwned"
    (last / STATE_TENSORS).write_bytes(pickle.dumps(_Payload(marker)))
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer_state.safetensors: not a readable safetensors file" in err
    assert not marker.exists()


def test_a_legacy_pickled_state_through_a_real_resume_is_refused_and_runs_nothing(fx, tmp_path, capsys):
    """A run folder as llm-modules 0.1 left it (trainer_state.pt, pickled) handed to `train --resume`: one line
    naming the file, the payload never unpickled, the weights there untouched."""
    from conftest import write_tiny_recipe

    recipe, _ = write_tiny_recipe(fx, tmp_path, rows=16, data_seed=3, adapter_dim=8)
    assert main(["train", "--config", str(recipe)]) == 0
    last = tmp_path / "run" / "last"
    (last / STATE_JSON).unlink()
    (last / STATE_TENSORS).unlink()
    marker = tmp_path / "pwned"
    (last / LEGACY_STATE).write_bytes(pickle.dumps(_Payload(marker)))
    weights = (last / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{last / LEGACY_STATE}: trainer state in pickle form" in err
    assert not marker.exists() and (last / "model.safetensors").read_bytes() == weights
