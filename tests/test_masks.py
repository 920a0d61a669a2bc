"""Packed speculative-decoding masks: bit layout, builders, FlashInfer view, argument validation."""

import pytest
import torch

from xqagen.masks import (as_flashinfer_mask, causal_mask, pack_mask, random_tree_mask, unpack_mask,
                          validate_mask, words_per_row)


def test_words_per_row():
    assert [words_per_row(n) for n in (1, 31, 32, 33, 64, 65)] == [1, 1, 1, 2, 2, 3]


def test_bit_order_of_hand_built_words():
    # Row 0: word 0 = bits 0 and 3, word 1 = bit 1 (token 33).  Row 1: bit 31 only, the int32 sign bit.
    words = torch.zeros(1, 40, 2, dtype=torch.int32)
    words[0, 0, 0] = 0b1001
    words[0, 0, 1] = 0b10
    words[0, 1, 0] = -2**31
    allowed = unpack_mask(words, 40)
    assert allowed[0, 0].nonzero().flatten().tolist() == [0, 3, 33]
    assert allowed[0, 1].nonzero().flatten().tolist() == [31]
    assert not allowed[0, 2:].any()
    assert torch.equal(pack_mask(allowed), words)


def test_pack_sets_bit_31_as_the_uint32_pattern():
    allowed = torch.zeros(1, 32, 32, dtype=torch.bool)
    allowed[0, 0, 31] = True
    allowed[0, 1, :] = True
    words = pack_mask(allowed)
    assert words.dtype == torch.int32
    assert words[0, :2, 0].tolist() == [-2**31, -1]
    assert words.view(torch.uint32)[0, 0, 0].item() == 2**31


@pytest.mark.parametrize("q_seq_len", [1, 5, 32, 33, 64, 70])
def test_round_trip(q_seq_len):
    generator = torch.Generator().manual_seed(q_seq_len)
    allowed = torch.rand(3, q_seq_len, q_seq_len, generator=generator) < 0.5
    words = pack_mask(allowed)
    assert words.shape == (3, q_seq_len, words_per_row(q_seq_len))
    assert torch.equal(unpack_mask(words, q_seq_len), allowed)
    assert torch.equal(unpack_mask(words.view(torch.uint32), q_seq_len), allowed)


def test_padding_bits_are_zero_and_ignored():
    allowed = torch.ones(1, 33, 33, dtype=torch.bool)
    words = pack_mask(allowed)
    assert words[0, 0].tolist() == [-1, 1]
    words[0, :, 1] |= 0b110  # bits for tokens 34 and 35, which do not exist
    assert torch.equal(unpack_mask(words, 33), allowed)


def test_causal_mask():
    words = causal_mask(2, 3)
    assert words.tolist() == [[[0b001], [0b011], [0b111]]] * 2
    expected = torch.ones(33, 33, dtype=torch.bool).tril().expand(4, 33, 33)
    assert torch.equal(unpack_mask(causal_mask(4, 33), 33), expected)


def test_random_tree_mask_is_a_forest_of_ancestor_chains():
    generator = torch.Generator().manual_seed(0)
    q_seq_len = 20
    allowed = unpack_mask(random_tree_mask(8, q_seq_len, generator), q_seq_len)
    for tree in allowed:
        assert tree.diagonal().all()
        assert not tree.triu(1).any(), "ancestors are earlier tokens"
        for token in range(q_seq_len):
            ancestors = tree[token, :token].nonzero().flatten().tolist()
            if ancestors:
                parent = ancestors[-1]
                expected = tree[parent].clone()
                expected[token] = True
                assert torch.equal(tree[token], expected), "a token sees exactly its parent's view plus itself"
    causal = torch.ones(q_seq_len, q_seq_len, dtype=torch.bool).tril()
    assert all(not torch.equal(tree, causal) for tree in allowed)


def test_random_tree_mask_is_reproducible_and_varies():
    first = random_tree_mask(4, 16, torch.Generator().manual_seed(5))
    again = random_tree_mask(4, 16, torch.Generator().manual_seed(5))
    other = random_tree_mask(4, 16, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("q_seq_len", [3, 33])
def test_flashinfer_view_has_the_same_bytes(q_seq_len):
    words = random_tree_mask(2, q_seq_len, torch.Generator().manual_seed(1))
    flashinfer = as_flashinfer_mask(words)
    assert flashinfer.dtype == torch.uint16
    assert flashinfer.shape == (2, q_seq_len, 2 * words_per_row(q_seq_len))
    assert torch.equal(flashinfer.view(torch.uint8), words.view(torch.uint8))
    halves = flashinfer.to(torch.int32)
    assert torch.equal(halves[..., 0::2] | (halves[..., 1::2] << 16), words)  # low half first
    assert torch.equal(as_flashinfer_mask(words.view(torch.uint32)), flashinfer)


def test_validation_errors():
    with pytest.raises(TypeError, match="allowed must be a torch.bool tensor"):
        pack_mask(torch.ones(1, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"allowed must have shape \[batch, q_seq_len, q_seq_len\]"):
        pack_mask(torch.ones(1, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="words must be an int32 or uint32 tensor"):
        unpack_mask(torch.zeros(1, 3, 1, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match=r"words must have shape .* = \['batch', 33, 2\], got \[1, 33, 1\]"):
        unpack_mask(torch.zeros(1, 33, 1, dtype=torch.int32), 33)
    with pytest.raises(ValueError, match=r"mask must have shape .* = \[2, 3, 1\], got \[1, 3, 1\]"):
        validate_mask(causal_mask(1, 3), 3, batch=2)
    with pytest.raises(ValueError, match="q_seq_len must be a positive integer"):
        causal_mask(1, 0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        random_tree_mask(0, 3)
    with pytest.raises(TypeError, match="words must be an int32 or uint32 tensor"):
        as_flashinfer_mask(torch.zeros(1, 3, 1, dtype=torch.uint16))
