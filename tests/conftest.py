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
