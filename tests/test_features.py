import json
from collections import namedtuple

import pytest
import torch

from llm_modules import features as F_
from llm_modules.data import Formatter, collate, parse_row
from llm_modules.features import FeatureCache, cache_key
from llm_modules.fixtures import arith_rows
from llm_modules.knowledge_source import KnowledgeSource, fingerprint_from_files
from llm_modules.training import train


@pytest.fixture
def cfg(tiny_train_config, tmp_path):
    def make(**kw):
        kw = {"warmup_steps": 0, "dropout": 0.0, "cache_dir": str(tmp_path / "cache"), **kw}
        return tiny_train_config(rows=80, data_seed=2, **kw)

    return make


def _losses(r):
    return [x["loss"] for x in r.records if "loss" in x], [x["val_loss"] for x in r.records if "val_loss" in x]


def test_training_from_cache_matches_live_and_never_loads_the_source(cfg, tmp_path, monkeypatch):
    live = train(cfg(output_dir=str(tmp_path / "live")), log=lambda s: None)
    cached = train(cfg(feature_cache=True), log=lambda s: None)  # builds the cache, then trains from it
    (lt, lv), (ct, cv) = _losses(live), _losses(cached)
    assert len(lt) == len(ct) and max(abs(a - b) for a, b in zip(lt, ct)) <= 2e-3
    assert max(abs(a - b) for a, b in zip(lv, cv)) <= 2e-3

    def boom(*a, **k):
        raise AssertionError("the knowledge source was loaded")

    monkeypatch.setattr(KnowledgeSource, "from_pretrained", boom)
    logs = []
    again = train(cfg(feature_cache=True, output_dir=str(tmp_path / "again")), log=logs.append)
    assert _losses(again) == (ct, cv)
    assert any("the knowledge source is not loaded" in s for s in logs)


def _examples(fx, n, seed=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx["large_qwen2"])
    f = Formatter(tok)
    return [f.encode(parse_row(r, f"row {i}")) for i, r in enumerate(arith_rows(n, seed))]


def test_stale_key_rebuilds(cfg, fx, tmp_path):
    logs = []
    train(cfg(feature_cache=True, epochs=1), log=logs.append)
    assert any("feature cache: " in s and "MiB" in s for s in logs)
    logs.clear()
    train(cfg(feature_cache=True, epochs=1, format="chat_template"), log=logs.append)
    assert any("stale or damaged: rebuilding" in s for s in logs)
    logs.clear()
    train(cfg(feature_cache=True, epochs=1, large_model=fx["large_llama"]), log=logs.append)
    assert any("stale or damaged: rebuilding" in s for s in logs)


def test_interrupted_build_resumes_and_corrupt_shard_is_rebuilt(fx, tmp_path, monkeypatch):
    exs = _examples(fx, 60)
    src = KnowledgeSource.from_pretrained(fx["large_qwen2"], "float32")
    key = cache_key(fingerprint_from_files(fx["large_qwen2"]), exs, -1, "float16")
    calls = []
    fail = [True]
    real = F_._run_source

    def flaky(source, examples, *a):
        calls.append(len(examples))
        if fail[0] and len(calls) == 3:
            raise RuntimeError("killed")  # killed while computing the third shard
        return real(source, examples, *a)

    monkeypatch.setattr(F_, "_run_source", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        FeatureCache.build(tmp_path, exs, key, src, shard_tokens=300, log=lambda s: None)
    assert FeatureCache.open(tmp_path, key) is None
    n_shards = len(json.loads((tmp_path / "progress.json").read_text())["plan"])
    assert n_shards > 3
    calls.clear()
    fail[0] = False
    cache = FeatureCache.build(tmp_path, exs, key, src, shard_tokens=300, log=lambda s: None)
    assert len(calls) == n_shards - 2  # the two finished shards were not redone
    # features equal a live forward within fp16 rounding
    h, _ = src(torch.tensor([exs[5].input_ids]))
    assert (cache.states(exs[5]).float() - h[0]).abs().max() <= 2e-3 * h.abs().max()
    # damage one shard: open() notices the checksum, build() redoes only that shard
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert FeatureCache.open(tmp_path, key) is None
    calls.clear()
    FeatureCache.build(tmp_path, exs, key, src, shard_tokens=300, log=lambda s: None)
    assert len(calls) == 1 and FeatureCache.open(tmp_path, key) is not None


def test_refuses_when_disk_is_short(fx, tmp_path, monkeypatch):
    exs = _examples(fx, 10)
    key = cache_key(fingerprint_from_files(fx["large_qwen2"]), exs, -1, "float16")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(F_.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    src = KnowledgeSource.from_pretrained(fx["large_qwen2"], "float32")
    with pytest.raises(OSError, match="the feature cache needs .* GiB but only .* GiB is free"):
        FeatureCache.build(tmp_path, exs, key, src, log=lambda s: None)


def test_fingerprint_from_files_equals_loaded(fx):
    for name in ("large_qwen2", "large_llama"):
        assert fingerprint_from_files(fx[name]) == KnowledgeSource.from_pretrained(fx[name], "bfloat16").fingerprint()


def test_lookup_tables_are_the_heads_top_k_over_the_stored_states(build, fx, tmp_path):
    """A cache for a knowledge-lookup module also stores the source's top-k predictions per position, read from the
    states as stored: training from them gives the loss and gradients of the head reading the cached states."""
    exs = _examples(fx, 12)
    src = KnowledgeSource.from_pretrained(fx["large_qwen2"], "float32", keep_head=True)
    key = cache_key(fingerprint_from_files(fx["large_qwen2"]), exs, -1, "float16", {"lookup_top_k": 6})
    cache = FeatureCache.build(tmp_path, exs, key, src, top_k=6, log=lambda s: None)
    assert FeatureCache.open(tmp_path, key).top_k == 6
    m = build(conditioning="prompt", knowledge_path="lookup", lookup_top_k=6, seed=3).eval()
    with torch.no_grad():
        m.lookup.query.weight.normal_(0, 1.0)
    batch = collate(exs[:4], 0)
    states, top = cache.batch(exs[:4]), cache.top(exs[:4])
    assert top[0].shape == (*states.shape[:2], 6) and top[0].dtype == torch.int32
    kw = dict(labels=batch["labels"], answer_mask=batch["answer_mask"], source_states=states, return_logits=False)
    stored = m(batch["input_ids"], batch["attention_mask"], source_top=top, **kw)
    live = m(batch["input_ids"], batch["attention_mask"], **kw)
    assert abs(stored.loss.item() - live.loss.item()) <= 1e-5
    ga, gb = (torch.autograd.grad(o.loss, m.lookup.key.weight)[0] for o in (stored, live))
    assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()
    with pytest.raises(ValueError, match="holds the top 6 predictions per position; this module's lookup reads 4"):
        build(conditioning="prompt", knowledge_path="lookup", lookup_top_k=4)(
            batch["input_ids"], batch["attention_mask"], source_top=top, **kw)
