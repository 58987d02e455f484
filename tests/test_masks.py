import torch

from llm_modules.masks import cross_attention_mask, decoder_inputs, is_packed, packed_inputs, position_ids_from_mask


def test_causal_mask_reads_only_past_and_real_keys():
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = cross_attention_mask(key_mask, 5, causal=True)[:, 0]
    # left padded row: query 3 reads keys 2 and 3 only
    assert m[0, 3].tolist() == [False, False, True, True, False]
    # a padding query with nothing to read falls back on its own key (finite softmax)
    assert m[0, 0].tolist() == [True, False, False, False, False]
    # right padded row: query 4 (padding) reads real keys <= 4, never padding
    assert m[1, 4].tolist() == [True, True, True, False, False]
    nc = cross_attention_mask(key_mask, 5, causal=False)[:, 0]
    assert nc[1, 0].tolist() == [True, True, True, False, False]


def test_mask_with_past_offset_for_decoding():
    key_mask = torch.tensor([[0, 1, 1, 1]])
    m = cross_attention_mask(key_mask, 1, causal=True, past_len=3)[:, 0]
    assert m[0, 0].tolist() == [False, True, True, True]


def test_packed_segments_do_not_see_each_other():
    key_mask = torch.tensor([[1, 1, 2, 2, 0]])
    m = cross_attention_mask(key_mask, 5, causal=True)[0, 0]
    assert m[2].tolist() == [False, False, True, False, False]
    assert m[3].tolist() == [False, False, True, True, False]


def test_positions_and_decoder_inputs_follow_the_segment_convention():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    m, pos = decoder_inputs(mask, torch.float32)
    assert m.tolist() == mask.tolist() and pos.tolist() == position_ids_from_mask(mask).tolist()
    _, ref = decoder_inputs(mask, torch.float32, reference=True)
    assert ref.tolist() == [[0, 1, 2, 3, 4]] * 2  # the reference code's positions, whatever the padding
    packed = torch.tensor([[1, 1, 2, 2, 2, 0]])
    assert is_packed(packed) and not is_packed(mask)
    add, pos = decoder_inputs(packed, torch.float32)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]  # positions restart per example
    assert torch.equal(add, packed_inputs(packed, torch.float32)[0])
    blocked = add[0, 0] < 0
    assert blocked[2, 1] and not blocked[3, 2] and blocked[2, 3]  # no look across examples, nor ahead


def test_delay_answers_unmarks_the_first_tokens_of_each_answer():
    from llm_modules.masks import delay_answers

    a = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
    assert delay_answers(a, 0) is a
    assert delay_answers(a, 1).tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0, 1]]
    assert delay_answers(a, 2).tolist() == [[0, 0, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]


def test_turn_starts_and_within_turn():
    from llm_modules.masks import turn_starts, within_turn

    a = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 0]])  # prompt, answer, prompt, answer, prompt
    assert turn_starts(a).tolist() == [[0, 0, 0, 0, 4, 4, 4, 7]]
    allowed = torch.ones(1, 8, 8, dtype=torch.bool).tril()
    kept = within_turn(allowed, a)
    assert kept[0, 5].tolist() == [False] * 4 + [True, True] + [False] * 2  # turn 2 reads from its own prompt on
    assert kept[0, 3].tolist() == [True] * 4 + [False] * 4  # the first turn is unchanged
    assert torch.equal(within_turn(allowed, None), allowed)
    assert torch.equal(within_turn(allowed[:, -1:], a)[0, 0], kept[0, -1])  # the last row alone, as decoding asks
    # Right padding after an answer (position 4 on): its rows read the real keys 0-3 and must not end up empty.
    padded = torch.ones(1, 6, 6, dtype=torch.bool).tril() & torch.tensor([1, 1, 1, 1, 0, 0]).bool()
    kept = within_turn(padded, torch.tensor([[0, 0, 1, 1, 0, 0]]))
    assert bool(kept.any(-1).all()) and torch.equal(kept[0, 4], padded[0, 4])
