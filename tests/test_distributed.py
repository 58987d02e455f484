"""Two CPU processes (gloo) under torchrun equal one process with the doubled batch."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from llm_modules.fixtures import arith_rows


def _run(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture
def recipe(fx, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(70, seed=3)))

    def make(name, **kw):
        d = dict(large_model=fx["large_qwen2"], small_model=fx["small_gpt_neo"], source_dtype="float32", num_heads=4,
                 adapter_dim=16, dropout=0.0, data=str(data), epochs=2, lr_bridge=3e-3, lr_small=3e-3, warmup_steps=2,
                 output_dir=str(tmp_path / name), progress=False, tensorboard=False, log_every=1, device="cpu")
        d.update(kw)
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d))
        return p

    return make


def _losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r], [r["val_loss"] for r in recs if "val_loss" in r]


def test_two_processes_equal_one_with_double_batch(recipe, tmp_path):
    cli = [sys.executable, "-m", "llm_modules.cli", "train"]
    # 63 training rows: the last global batch is short, so one rank gets less (or nothing).
    _run(cli + ["--config", str(recipe("one", batch_size=10, grad_accum=2))])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "llm_modules.cli", "train", "--config", str(recipe("two", batch_size=5, grad_accum=2))])
    (l1, v1), (l2, v2) = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 8
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(v1, v2)) <= 1e-5
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # Killed on 2 processes after 3 steps, resumed on 1 with the same global batch: same end.
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "llm_modules.cli", "train", "--config", str(recipe("mixed", batch_size=5, grad_accum=2)), "--stop-after", "3"])
    r = _run(cli + ["--config", str(recipe("mixed", batch_size=10, grad_accum=2)), "--resume"])
    assert "resuming on 1 process(es) from a run on 2" in r.stdout + r.stderr
    c = load_file(str(tmp_path / "mixed" / "last" / "model.safetensors"))
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-5
    assert _losses(tmp_path / "mixed")[0] == pytest.approx(l1, abs=1e-5)


def test_feature_cache_built_by_two_ranks(recipe, tmp_path):
    """Each rank writes its share of the shards; training from them matches a live single-process run."""
    _run([sys.executable, "-m", "llm_modules.cli", "train", "--config", str(recipe("live", batch_size=10, epochs=1))])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "llm_modules.cli", "train", "--config",
          str(recipe("cached", batch_size=5, epochs=1, feature_cache=True, cache_dir=str(tmp_path / "fc")))],
         {"LLM_MODULES_SHARD_TOKENS": "400"})
    index = json.loads((tmp_path / "fc" / "index.json").read_text())
    assert len(index["shards"]) >= 2
    (l1, v1), (l2, v2) = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert len(l1) == len(l2) and max(abs(a - b) for a, b in zip(l1 + v1, l2 + v2)) <= 2e-3
