import json
import time

import pytest
from safetensors.torch import load_file

from llm_modules.training import train


@pytest.fixture
def cfg(tiny_train_config):
    return tiny_train_config


def test_tiny_run_validation_loss_falls(cfg, tmp_path):
    r = train(cfg(epochs=3), log=lambda s: None)
    assert r.first_val_loss > 5.0
    assert r.best_val_loss < 0.6 * r.first_val_loss
    out = tmp_path / "run"
    assert (out / "best" / "model.safetensors").exists() and (out / "loss_curve.png").stat().st_size > 1000
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in x for x in recs) and any("tokens_per_s" in x for x in recs)


def test_killed_and_resumed_run_ends_with_same_weights(cfg, tmp_path):
    full = train(cfg(grad_accum=2, output_dir=str(tmp_path / "a")), log=lambda s: None)
    part = train(cfg(grad_accum=2, output_dir=str(tmp_path / "b")), stop_after=3, log=lambda s: None)
    assert part.steps == 3  # killed mid-epoch (4 optimiser steps per epoch)
    rest = train(cfg(grad_accum=2, output_dir=str(tmp_path / "b")), resume=True, log=lambda s: None)
    assert rest.steps == full.steps
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert abs(full.best_val_loss - rest.best_val_loss) <= 1e-6
    steps_b = [x["step"] for x in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert steps_b == sorted(set(steps_b))  # no duplicated records after resume


def test_early_stopping(cfg):
    r = train(cfg(epochs=6, lr_bridge=0.0, lr_small=0.0, patience=2), log=lambda s: None)
    assert r.stopped_early and r.steps == 2 * 14  # 2 epochs without improvement after the first


def test_packing_trains_on_fewer_rows(cfg):
    plain = train(cfg(epochs=2), log=lambda s: None)
    packed = train(cfg(epochs=6, packing=True, output_dir=cfg().output_dir + "_p"), log=lambda s: None)
    assert packed.steps < plain.steps  # 3x the epochs in fewer steps: ~40-token examples packed into 256-token rows
    assert packed.best_val_loss < 0.7 * packed.first_val_loss


def test_gradient_checkpointing_gives_the_same_losses(cfg, tmp_path):
    a = train(cfg(epochs=1, dropout=0.0, output_dir=str(tmp_path / "a")), log=lambda s: None)
    b = train(cfg(epochs=1, dropout=0.0, gradient_checkpointing=True, output_dir=str(tmp_path / "b")), log=lambda s: None)
    la = [r["loss"] for r in a.records if "loss" in r]
    lb = [r["loss"] for r in b.records if "loss" in r]
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5


def test_bf16_autocast_with_bf16_source_and_packing(cfg, tmp_path):
    """The GPU configuration (bf16 autocast, bf16 source, packed rows) runs end to end and learns."""
    r = train(cfg(precision="bf16", source_dtype="bfloat16", packing=True, epochs=4,
                  output_dir=str(tmp_path / "bf")), log=lambda s: None)
    assert r.best_val_loss < 0.8 * r.first_val_loss


def test_max_steps_eval_every_and_save_every(cfg, monkeypatch):
    """max_steps ends the run mid-epoch; validation runs every eval_every steps and at the end; `last` is saved
    every save_every steps and at the end (an epoch here is 14 steps: no epoch end interferes)."""
    from llm_modules.training.trainer import Trainer

    validated, saved = [], []
    real_validate, real_save = Trainer.validate, Trainer.save
    monkeypatch.setattr(Trainer, "validate", lambda self: (validated.append(self.step_count), real_validate(self))[1])
    monkeypatch.setattr(Trainer, "save", lambda self, folder, with_state=False: (
        saved.append((self.step_count, folder.name, with_state)), real_save(self, folder, with_state))[1])
    r = train(cfg(epochs=3, max_steps=7, eval_every=2, save_every=3), log=lambda s: None)
    assert r.steps == 7
    assert validated == [0, 2, 4, 6, 7]  # the starting point, every 2 steps, the end
    assert [s for s, name, state in saved if name == "last"] == [3, 6, 7]
    assert all(state for _, name, state in saved if name == "last")


def _train_process(recipe, *extra):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-m", "llm_modules.cli", "train", "--config", str(recipe), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_process_killed_at_a_random_moment_resumes_to_the_same_weights(fx, tmp_path):
    """SIGKILL (no handler runs, no final save) at a random moment of a run that saves `last` at every step, so
    the kill may land mid-step or mid-save; --resume then ends with the weights of an uninterrupted run."""
    import random
    import signal

    from conftest import write_tiny_recipe

    from llm_modules.io import read_json

    runs = {}
    for name in ("whole", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        recipe, _ = write_tiny_recipe(fx, folder, rows=64)
        recipe.write_text(recipe.read_text().replace("epochs: 1", "epochs: 8") + "save_every: 1\nlr_bridge: 0.003\n")
        runs[name] = recipe
    whole = _train_process(runs["whole"])
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out
    total = read_json(tmp_path / "whole" / "run" / "last" / "trainer_state.json")["step"]
    target, delay = random.randint(2, total // 2), random.uniform(0.0, 0.05)
    state = tmp_path / "killed" / "run" / "last" / "trainer_state.json"
    proc = _train_process(runs["killed"])
    step = 0
    while step < target and proc.poll() is None:
        try:
            step = read_json(state)["step"]
        except (FileNotFoundError, ValueError):  # not written yet, or being replaced right now
            pass
        time.sleep(0.005)  # poll, without taking a core from the training process
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    why = f"killed {delay:.3f} s after step {target} of {total}"
    assert proc.returncode == -signal.SIGKILL, why
    resumed = _train_process(runs["killed"], "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, f"{why}: {out}"
    a = load_file(str(tmp_path / "whole" / "run" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "run" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, why
    assert read_json(state)["step"] == total, why
    steps = [x["step"] for x in map(json.loads, (tmp_path / "killed" / "run" / "metrics.jsonl").read_text().splitlines())
             if "loss" in x]
    assert steps == sorted(set(steps)), why  # no step logged twice across the kill


def test_a_folder_a_kill_left_mid_save_is_put_back(tmp_path):
    """The window of atomic_dir a kill can hit: the old `last` moved aside, the new one not yet in place."""
    from llm_modules.io import recover_dir

    last = tmp_path / "last"
    old, half = tmp_path / ".last.old.1234", tmp_path / ".last.abc.tmp"
    old.mkdir(), half.mkdir()
    (old / "trainer_state.json").write_text("{}")
    (half / "model.safetensors").write_text("half")
    assert recover_dir(last) and (last / "trainer_state.json").exists()
    assert not old.exists() and not half.exists()
    assert not recover_dir(last) and last.exists()  # nothing to do the second time
