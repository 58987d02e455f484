"""Answer text as tokens arrive: stop sequences held back and cut, decoding kept incremental."""

from llm_modules.inference.text import AnswerText


def test_answer_text_holds_back_a_partial_stop_and_cuts_at_it(fx):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx["tokenizer"])
    ids = tok("abc END xyz", add_special_tokens=False).input_ids
    t = AnswerText(tok, ["END"])
    sent = "".join(t.add(i) for i in ids if not t.stopped)
    assert sent == "abc " and t.stopped and t.flush() == ""
    t = AnswerText(tok, ["ENDX"])
    sent = "".join(t.add(i) for i in ids) + t.flush()
    assert sent == "abc END xyz" and not t.stopped


def test_answer_text_is_incremental_and_equals_the_whole_decoding(fx):
    """Piece by piece, a long answer with multi-byte characters comes out as decoding it whole would; each token
    costs a decode of a few tokens, not of the answer so far."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx["tokenizer"])
    ids = tok(" ".join(["naïve café — 東京 🙂 The river ran, slowly."] * 40), add_special_tokens=False).input_ids
    assert len(ids) > 400
    sizes = []
    real = tok.decode
    tok.decode = lambda x, **k: (sizes.append(len(x)), real(x, **k))[1]
    t = AnswerText(tok, ["never occurs"])
    sent = "".join(t.add(i) for i in ids) + t.flush()
    tok.decode = real
    assert sent == real(ids, skip_special_tokens=False).rstrip("\ufffd") and t.text == sent
    assert max(sizes) <= 16  # a window of recent tokens, never the whole answer
