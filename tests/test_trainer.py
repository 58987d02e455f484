import json

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
