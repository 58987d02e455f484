import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(min(2, torch.get_num_threads()))

from llm_modules.fixtures import make_fixtures  # noqa: E402
from llm_modules.model import LLMModule  # noqa: E402

LARGE = ["large_qwen2", "large_llama"]
SMALL = ["small_gpt_neo", "small_gpt2", "small_qwen2"]


def run_decode(m, ids, mask, use_cache, n=64, **kw):
    """(tokens [B, n], raw logits [B, n, V]) of greedy decoding with no end of sequence."""
    from llm_modules.decode import decode

    toks, logits = [], []
    for nxt, lg, _ in decode(m, ids, mask, max_new_tokens=n, eos_token_id=[], use_cache=use_cache, **kw):
        toks.append(nxt)
        logits.append(lg)
    return torch.stack(toks, 1), torch.stack(logits, 1)


@pytest.fixture(scope="session")
def fx(tmp_path_factory):
    """Paths of the tiny local tokenizer and models (made once per test session)."""
    return make_fixtures(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture
def build(fx):
    def _build(large="large_qwen2", small="small_gpt_neo", seed=0, **kw):
        torch.manual_seed(seed)
        kw.setdefault("source_dtype", "float32")
        return LLMModule.build(fx[large], fx[small], **kw)

    return _build


@pytest.fixture
def tiny_train_config(fx, tmp_path):
    """make(rows, data_seed, **overrides) -> a TrainConfig on the tiny fixtures and arithmetic rows."""
    import json

    from llm_modules.fixtures import arith_rows
    from llm_modules.training import TrainConfig

    def make(rows: int = 120, data_seed: int = 1, **kw):
        data = tmp_path / f"arith-{rows}-{data_seed}.jsonl"
        if not data.exists():
            data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(rows, seed=data_seed)))
        base = dict(large_model=fx["large_qwen2"], small_model=fx["small_gpt_neo"], source_dtype="float32",
                    num_heads=4, adapter_dim=16, data=str(data), max_length=256, epochs=2, batch_size=8,
                    lr_bridge=3e-3, lr_small=3e-3, warmup_steps=2, output_dir=str(tmp_path / "run"),
                    progress=False, tensorboard=False, log_every=1)
        base.update(kw)
        return TrainConfig.from_dict(base)

    return make


def write_tiny_recipe(fx, folder, rows: int = 40, data_seed: int = 5, adapter_dim: int = 16):
    """(recipe path, data path): a one-epoch recipe on the tiny fixtures and arithmetic rows, for CLI tests."""
    import json

    from llm_modules.fixtures import arith_rows

    data = folder / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arith_rows(rows, seed=data_seed)))
    recipe = folder / "r.yaml"
    recipe.write_text(f"large_model: {fx['large_qwen2']}\nsmall_model: {fx['small_gpt_neo']}\nsource_dtype: float32\n"
                      f"num_heads: 4\nadapter_dim: {adapter_dim}\ndata: {data}\nepochs: 1\nbatch_size: 8\n"
                      f"output_dir: {folder / 'run'}\nprogress: false\ntensorboard: false\n")
    return recipe, data


@pytest.fixture(scope="session")
def served_modules(fx, tmp_path_factory):
    """{name: folder} of saved tiny modules for the server: three on one source (token and prompt conditioning, and
    prompt conditioning with the adaptive schedule, at a threshold where these random weights catch up now and then),
    one on another source (fast mode with the knowledge lookup, which reads the source's head)."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for name, large, kw in (("alpha", "large_qwen2", {}), ("beta", "large_qwen2", {"conditioning": "prompt"}),
                            ("gamma", "large_llama", {"conditioning": "prompt", "knowledge_path": "lookup"}),
                            ("delta", "large_qwen2", {"conditioning": "prompt", "source_adaptive": 0.25,
                                                      "source_entropy": 0.03})):
        torch.manual_seed(len(out))
        m = LLMModule.build(fx[large], fx["small_gpt_neo"], source_dtype="float32",
                            prompt={"format": "paper", "system_prompt": "Be brief."}, **kw)
        with torch.no_grad():
            m.generation.lm_head.weight.normal_(0, 0.5)  # varied tokens rather than one repeated
        m.save_pretrained(root / name)
        out[name] = str(root / name)
    return out
