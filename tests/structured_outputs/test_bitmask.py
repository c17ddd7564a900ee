from __future__ import annotations

import torch

from kvmem.engine.sampler import SamplingRow, sample
from kvmem.sampling_params import SamplingParams
from kvmem.structured_outputs.bitmask import apply_grammar_masks


class AllowOnly:
    """A stand-in matcher: allows exactly `tokens` (None: every token, reported as nothing to apply)."""

    def __init__(self, tokens: list[int] | None) -> None:
        self.tokens = tokens

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int) -> bool:
        if self.tokens is None:
            return False
        bitmask[index] = 0
        for t in self.tokens:
            word = bitmask[index, t // 32].item() | (1 << (t % 32))
            bitmask[index, t // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32 wrap
        return True


def test_masks_only_the_constrained_rows_and_only_disallowed_tokens():
    vocab = 70  # not a multiple of 32: the last word is partial
    logits = torch.randn(4, vocab)
    before = logits.clone()
    apply_grammar_masks(logits, [1, 3], [AllowOnly([0, 31, 32, 69]), AllowOnly(None)])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.equal(logits[3], before[3])  # all allowed: untouched
    kept = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert kept == [0, 31, 32, 69]
    assert torch.equal(logits[1, kept], before[1, kept])


def test_sampler_picks_inside_the_grammar_greedy_and_random_in_bf16_too():
    vocab = 100
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(3, vocab, dtype=dtype)
        logits[:, 7] = 10.0  # every row's favourite
        rows = [SamplingRow(SamplingParams(temperature=0), [1], [], grammar=AllowOnly([40, 41])),
                SamplingRow(SamplingParams(temperature=0), [1], []),
                SamplingRow(SamplingParams(temperature=1.0, seed=3), [1], [], grammar=AllowOnly([55]),
                            generator=torch.Generator().manual_seed(3))]
        tokens = [t.token_id for t in sample(logits, rows, eos_token_ids=[0])]
        assert tokens[0] in (40, 41) and tokens[1] == 7 and tokens[2] == 55


def test_forbidden_tokens_unpack_like_the_bit_definition():
    from kvmem.structured_outputs.bitmask import forbidden_tokens

    torch.manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32)
    vocab = 100
    expected = torch.tensor([[not (int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
                             for r in range(3)])
    assert torch.equal(forbidden_tokens(bitmask, vocab), expected)


def test_every_row_constrained_masks_in_place():
    logits = torch.randn(2, 40)
    apply_grammar_masks(logits, [0, 1], [AllowOnly([3]), AllowOnly([39])])
    assert torch.isfinite(logits).nonzero().tolist() == [[0, 3], [1, 39]]
