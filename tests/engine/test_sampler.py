import math

import pytest
import torch

from kvmem.engine.sampler import (
    SampledToken,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p,
    prompt_logprobs,
    sample,
    sampling_probs,
)
from kvmem.sampling_params import SamplingParams

EOS = [0]


def row(prompt=(), output=(), generator=None, **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), list(prompt), list(output), generator)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(logits_row: torch.Tensor, n: int, **kwargs) -> set[int]:
    """The set of tokens seen over n draws of one distribution (one batch of n identical rows)."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return {t.token_id for t in sample(logits, [row(**kwargs)] * n, EOS)}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(1234)


# --- greedy -----------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    logits = torch.randn(8, 100)
    out = sample(logits, [row(temperature=0.0) for _ in range(8)], EOS)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


@pytest.mark.parametrize("params", [
    {"temperature": 0.0},  # the fast path: argmax of the bf16 logits
    {"temperature": 0.0, "min_tokens": 5},  # -inf masking, still in bf16
    {"temperature": 0.0, "repetition_penalty": 1.5, "presence_penalty": 0.5},  # arithmetic: float32
    {"temperature": 0.0, "logprobs": 3},
    {"temperature": 0.8, "seed": 7},
])
def test_bfloat16_logits_sample_as_their_float32_widening(params):
    """The model hands over logits in its own dtype; the result must be what float32 logits give."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 50, generator=g) * 3).bfloat16()
    logits[:, EOS[0]] = 20.0  # EOS would win where min_tokens does not mask it
    def rows():
        return [row(prompt=[1, 2], output=[3], generator=gen(7) if "seed" in params else None, **params)
                for _ in range(4)]
    got = sample(logits.clone(), rows(), EOS)
    want = sample(logits.float(), rows(), EOS)
    assert [(t.token_id, t.logprob, t.top_logprobs) for t in got] == \
        [(t.token_id, t.logprob, t.top_logprobs) for t in want]
    if "min_tokens" in params:
        assert all(t.token_id != EOS[0] for t in got)


def test_logprobs_stay_raw_when_penalties_apply():
    logits = torch.tensor([[1.0, 3.0, 2.5]])  # the penalty takes token 1 from 3.0 to 1.0
    raw_lp = torch.log_softmax(logits, -1)[0]
    [t] = sample(logits.clone(), [row(output=[1], temperature=0.0, presence_penalty=2.0, logprobs=1)], EOS)
    assert t.token_id == 2 and t.logprob == pytest.approx(raw_lp[2].item())


def test_empty_batch_and_shape_check():
    assert sample(torch.empty(0, 10), [], EOS) == []
    with pytest.raises(ValueError):
        sample(torch.randn(2, 10), [row()], EOS)


def test_mixed_batch_greedy_rows_are_argmax_after_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [5.0, 0.0, 0.0]])
    rows = [row(temperature=0.0), row(temperature=0.0, output=[1], presence_penalty=2.0),
            row(temperature=1.0, top_k=1)]
    assert [t.token_id for t in sample(logits, rows, EOS)] == [1, 2, 0]


# --- seeded reproducibility -------------------------------------------------------------------------

OTHER_PARAMS = [
    dict(temperature=0.7, top_k=5, min_p=0.1, presence_penalty=0.5),
    dict(temperature=0.0, logprobs=2),
    dict(top_p=0.5),
    dict(top_k=400, top_p=0.99, repetition_penalty=1.3),
    dict(temperature=1.5, min_tokens=5),
]


def _run_seeded(seed: int, logits_steps: list[torch.Tensor], position: int, batch: int,
                **kwargs) -> list[int]:
    """Sample a seeded row for several steps, sitting at `position` in a batch of `batch` rows whose
    other rows have their own (different) logits and params."""
    g = gen(seed)
    out = []
    for step, target in enumerate(logits_steps):
        others = torch.randn(batch, target.shape[0]) * 3
        others[position] = target
        # The other rows' params change which code paths the batch takes (e.g. how many top-k
        # candidates are looked at, whether some rows are greedy or seeded).
        rows = [row(**OTHER_PARAMS[(j + step) % len(OTHER_PARAMS)], output=[1, 2],
                    generator=gen(100 + j) if j % 2 else None) for j in range(batch)]
        rows[position] = row(generator=g, output=out, **kwargs)
        out.append(sample(others, rows, EOS)[position].token_id)
    return out


def test_same_seed_same_tokens_in_any_batch():
    steps = [torch.randn(500) for _ in range(20)]
    a = _run_seeded(7, steps, position=0, batch=1)
    b = _run_seeded(7, steps, position=3, batch=5)
    c = _run_seeded(7, steps, position=6, batch=7)
    assert a == b == c
    d = _run_seeded(8, steps, position=0, batch=1)
    assert a != d


def test_same_seed_same_tokens_with_filters_and_penalties():
    steps = [torch.randn(300) for _ in range(15)]
    kw = dict(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, frequency_penalty=0.3,
              repetition_penalty=1.1, prompt=[4, 5, 6])
    a = _run_seeded(11, steps, position=0, batch=1, **kw)
    b = _run_seeded(11, steps, position=2, batch=4, **kw)
    assert a == b


@pytest.mark.parametrize("scale", [0.1, 3.0])  # 0.1: flat rows, top-p falls back to a full sort
def test_same_seed_same_tokens_with_top_p_over_a_large_vocab(scale):
    steps = [torch.randn(3000) * scale for _ in range(8)]
    kw = dict(temperature=0.5, top_p=0.8)
    a = _run_seeded(5, steps, position=0, batch=1, **kw)
    b = _run_seeded(5, steps, position=4, batch=6, **kw)
    assert a == b


def test_unseeded_rows_differ_from_each_other():
    logits = torch.zeros(2, 10_000)
    out = sample(logits, [row(), row()], EOS)
    assert out[0].token_id != out[1].token_id  # 1 in 10_000 chance to fail; seeded global RNG


# --- temperature and the draw ------------------------------------------------------------------------

def test_draws_follow_softmax_of_logits_over_temperature():
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        n = 40_000
        logits = base.expand(n, -1).contiguous()
        out = sample(logits, [row(temperature=temperature)] * n, EOS)
        counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=4).float() / n
        expected = torch.softmax(base / temperature, -1)
        assert torch.allclose(counts, expected, atol=0.015), (temperature, counts, expected)


def test_unseeded_rows_beside_seeded_ones_follow_the_softmax_and_seeded_rows_keep_their_tokens():
    """Rows without a seed (one uniform each, inverse CDF) and seeded rows (their own race) in one
    batch: the unseeded draws still follow the distribution, the seeded row what it draws alone."""
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20_000
    logits = base.expand(n + 1, -1).contiguous()
    out = sample(logits.clone(), [row()] * n + [row(seed=5, generator=gen(5))], EOS)
    counts = torch.bincount(torch.tensor([t.token_id for t in out[:n]]), minlength=4).float() / n
    assert torch.allclose(counts, torch.softmax(base, -1), atol=0.015), counts
    alone = sample(base[None].clone(), [row(seed=5, generator=gen(5))], EOS)
    assert out[n].token_id == alone[0].token_id


def test_inverse_cdf_never_picks_a_token_without_probability(monkeypatch):
    """u * total can round up to the total; the draw then takes the last token with p > 0, never the
    zero-probability tokens after it (nor an index past the vocabulary)."""
    from kvmem.engine import sampler

    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.ones(2, 1))  # the rounded-up case
    assert sampler._inverse_cdf_draw(probs, None).tolist() == [1, 2]
    monkeypatch.setattr(sampler.torch, "rand", lambda *a, **k: torch.zeros(2, 1))
    assert sampler._inverse_cdf_draw(probs, None).tolist() == [0, 2]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8])
def test_a_tiny_temperature_picks_the_most_likely_token(temperature):
    """Below SAMPLING_EPS a temperature is greedy: never logits / 1e-40, which overflows float32 to
    +-inf and made softmax NaN, so the least likely token won."""
    logits = torch.tensor([[3.0, 9.0, -5.0, 1.0]] * 4)
    rows = [row(temperature=temperature), row(temperature=temperature, seed=1, generator=gen(1)),
            row(temperature=temperature, logprobs=1), row(temperature=temperature, top_p=0.5, top_k=3)]
    assert [t.token_id for t in sample(logits.clone(), rows, EOS)] == [1] * 4


def test_sampling_probs_never_divide_by_a_tiny_temperature():
    # A caller that bypasses `greedy` (params changed after validation) still gets finite numbers.
    params = SamplingParams(temperature=1.0)
    params.temperature = 1e-40
    probs = sampling_probs(torch.tensor([[3.0, 9.0, -5.0, 1.0]]), [params])
    assert torch.isfinite(probs).all() and int(probs.argmax()) == 1


# --- top-k / top-p / min-p --------------------------------------------------------------------------

def test_top_k_only_samples_the_top_k():
    logits = torch.randn(1000)
    top5 = set(logits.topk(5).indices.tolist())
    assert draws(logits, 3000, top_k=5, temperature=3.0) == top5
    assert draws(logits, 200, top_k=1) == {int(logits.argmax())}


def test_top_k_keeps_ties_with_the_kth_token():
    # The filter is a cutoff value, so tokens tied with the k-th are kept (as in vLLM).
    logits = torch.tensor([[1.0, 3.0, 1.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits, [2], [1.0])
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False]
    out = apply_top_k_top_p(logits, [3], [1.0])
    assert torch.isfinite(out[0]).tolist() == [True, True, True, True, False]


def reference_keep(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Straight from the definition, one row, full sort."""
    order = logits.argsort(descending=True).tolist()
    if top_k > 0:
        order = order[:top_k]
    probs = torch.softmax(logits[order].double(), -1).tolist()  # renormalized after top-k
    kept, mass = [], 0.0
    for token, prob in zip(order, probs):
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append(token)
        mass += prob
    return set(kept)


def test_top_k_top_p_matches_reference_in_mixed_batches():
    gen_ = torch.Generator().manual_seed(0)
    settings = [(0, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (40, 0.95), (2000, 0.9), (3, 0.3), (0, 0.999)]
    for scale in (0.3, 1.0, 4.0):  # flat rows push top-p past the top-1024 candidates (full sort)
        logits = torch.randn(len(settings), 3000, generator=gen_) * scale
        out = apply_top_k_top_p(logits, [k for k, _ in settings], [p for _, p in settings])
        for i, (k, p) in enumerate(settings):
            got = set(torch.isfinite(out[i]).nonzero().flatten().tolist())
            assert got == reference_keep(logits[i], k, p), (scale, k, p)
            assert torch.equal(out[i][torch.isfinite(out[i])], logits[i][torch.isfinite(out[i])])


PROBS = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05)


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.01, {1}), (0.35, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 3, 4, 0}), (0.99, {0, 1, 2, 3, 4}),
     (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_set(top_p, expected):
    logits = PROBS.log()
    assert draws(logits, 4000, top_p=top_p) == expected
    masked = apply_top_k_top_p(logits.unsqueeze(0), [0], [top_p])
    assert set(torch.isfinite(masked[0]).nonzero().flatten().tolist()) == expected


def test_top_k_then_top_p():
    # top_p applies to the distribution renormalized after top_k:
    # top_k=3 turns {0.4, 0.3, 0.15} into {0.47, 0.35, 0.18}.
    logits = PROBS.log()
    assert draws(logits, 4000, top_k=3, top_p=0.85) == {1, 3, 4}
    assert draws(logits, 4000, top_k=3, top_p=0.8) == {1, 3}
    assert draws(logits, 4000, top_k=3, top_p=0.45) == {1}
    assert draws(logits, 4000, top_p=0.45) == {1, 3}  # without top_k, 0.4 < 0.45 needs a second token


@pytest.mark.parametrize(
    "min_p, expected",
    [(0.0, {0, 1, 2, 3, 4}), (0.2, {0, 1, 3, 4}), (0.3, {1, 3, 4}), (0.5, {1, 3}), (0.9, {1}), (1.0, {1})],
)
def test_min_p_set(min_p, expected):
    assert draws(PROBS.log(), 4000, min_p=min_p) == expected


def test_filters_are_per_row_in_a_batch():
    logits = PROBS.log().expand(3, -1).contiguous()
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.6), SamplingParams(min_p=0.5)]
    probs = sampling_probs(logits, params)
    assert (probs > 0).tolist() == [
        [False, True, False, False, False],
        [False, True, False, True, False],
        [False, True, False, True, False],
    ]
    assert torch.allclose(probs[1, [1, 3]], torch.tensor([0.4, 0.3]) / 0.7)


# --- penalties ---------------------------------------------------------------------------------------

def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    rows = [row(prompt=[0], output=[1, 1], repetition_penalty=2.0)]
    apply_penalties(logits, rows)
    # tokens 0 and 1 seen (prompt + output): positive / 2, negative * 2; others untouched
    assert logits.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.5]]


def test_presence_and_frequency_penalties_use_output_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    rows = [row(prompt=[3, 3, 3], output=[0, 1, 1, 1], presence_penalty=0.5, frequency_penalty=0.25)]
    apply_penalties(logits, rows)
    # token 0: count 1 -> 1 - 0.25 - 0.5; token 1: count 3 -> 1 - 0.75 - 0.5; prompt token 3 untouched
    assert logits.tolist() == [[0.25, -0.25, 1.0, 1.0]]


def test_penalties_are_per_row_and_combine():
    logits = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [1.0, -1.0, 2.0]])
    rows = [
        row(output=[0, 1], repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=-1.0),
        row(output=[0, 1]),  # no penalties: untouched
        row(prompt=[2], output=[], repetition_penalty=0.5),  # < 1 rewards repeats
    ]
    apply_penalties(logits, rows)
    assert logits.tolist() == [
        [1.0 / 2 - 1.0 + 1.0, -1.0 * 2 - 1.0 + 1.0, 2.0],
        [1.0, -1.0, 2.0],
        [1.0, -1.0, 4.0],
    ]


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert sample(logits.clone(), [row(temperature=0.0, output=[0], presence_penalty=0.2)], EOS)[0].token_id == 1
    assert sample(logits.clone(), [row(temperature=0.0, output=[0], presence_penalty=0.05)], EOS)[0].token_id == 0


# --- min_tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_blocks_eos_and_stop_ids(ignore_eos):
    logits = torch.tensor([[10.0, 0.0, 9.0, 1.0]])  # eos (0) then stop id 2 are the most likely
    kw = dict(temperature=0.0, min_tokens=2, stop_token_ids=[2], ignore_eos=ignore_eos)
    assert sample(logits.clone(), [row(output=[], **kw)], EOS)[0].token_id == 3
    assert sample(logits.clone(), [row(output=[3], **kw)], EOS)[0].token_id == 3
    assert sample(logits.clone(), [row(output=[3, 3], **kw)], EOS)[0].token_id == 0


def test_min_tokens_blocks_eos_when_sampling():
    logits = torch.tensor([5.0, 0.0, 0.0, 5.0])
    eos = [0, 3]
    n = 2000
    out = sample(logits.expand(n, -1).contiguous(), [row(min_tokens=1)] * n, eos)
    assert {t.token_id for t in out} == {1, 2}


# --- logprobs -----------------------------------------------------------------------------------------

def test_logprobs_come_from_raw_logits():
    logits = torch.randn(3, 64)
    rows = [
        row(logprobs=3, temperature=0.5, repetition_penalty=1.5, output=[1, 2, 3], generator=gen(0)),
        row(logprobs=0, temperature=0.0, presence_penalty=1.0, output=[5]),
        row(),  # no logprobs asked: None
    ]
    out = sample(logits, rows, EOS)
    expected = torch.log_softmax(logits, dim=-1)
    for i, n in ((0, 3), (1, 0)):
        t = out[i]
        assert math.isclose(t.logprob, expected[i, t.token_id].item(), rel_tol=1e-6, abs_tol=1e-6)
        top = expected[i].topk(n)
        want = dict(zip(top.indices.tolist(), top.values.tolist()))
        want[t.token_id] = expected[i, t.token_id].item()
        assert t.top_logprobs.keys() == want.keys()
        for k, v in want.items():
            assert math.isclose(t.top_logprobs[k], v, rel_tol=1e-6, abs_tol=1e-6)
        assert t.rank == int((expected[i] > expected[i, t.token_id]).sum()) + 1
    assert out[2].logprob is None and out[2].top_logprobs is None and out[2].rank is None


def test_logprobs_chosen_token_outside_top_k_is_included():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    # presence penalty pushes greedy off the top token, so it picks token 1 (rank 2)
    t = sample(logits, [row(temperature=0.0, logprobs=1, output=[0], presence_penalty=2.0)], EOS)[0]
    assert t.token_id == 1 and t.rank == 2
    assert set(t.top_logprobs) == {0, 1}


def test_sampled_token_defaults():
    assert SampledToken(3) == SampledToken(3, None, None, None)


# --- logit_bias --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_bias_is_added_before_greedy_choice_per_row(dtype):
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]], dtype=dtype)
    rows = [row(temperature=0, logit_bias={3: 4.5}), row(temperature=0),
            row(temperature=0, logit_bias={1: -100.0})]
    assert [t.token_id for t in sample(logits, rows, EOS)] == [3, 0, 2]


def test_logit_bias_shapes_the_sampled_distribution_and_logprobs_stay_raw():
    logits = torch.zeros(64, 8)
    seen = {t.token_id for t in sample(logits.clone(), [row(logit_bias={5: 100.0})] * 64, EOS)}
    assert seen == {5}
    seen = {t.token_id for t in sample(logits.clone(), [row(logit_bias={i: -100.0 for i in range(7)})] * 64, EOS)}
    assert seen == {7}
    (token,) = sample(torch.zeros(1, 8), [row(temperature=0, logprobs=1, logit_bias={5: 100.0})], EOS)
    assert token.token_id == 5 and token.logprob == pytest.approx(math.log(1 / 8))


def test_logit_bias_combines_with_penalties_and_min_tokens():
    logits = torch.tensor([[5.0, 2.0, 1.0, 0.0]])
    # EOS (0) is masked by min_tokens whatever its bias; token 1 is penalized, token 2 biased up.
    (token,) = sample(logits, [row(output=[1], temperature=0, min_tokens=3, presence_penalty=2.0,
                                   logit_bias={0: 100.0, 2: 0.5})], EOS)
    assert token.token_id == 2


# --- prompt logprobs ---------------------------------------------------------------------------------

def test_prompt_logprobs_score_the_next_prompt_token_from_raw_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]], dtype=torch.bfloat16)
    scored = prompt_logprobs(logits, [1, 0], 2)
    expected = logits.float().log_softmax(dim=-1)
    (lp0, rank0, top0), (lp1, rank1, top1) = scored
    assert lp0 == pytest.approx(expected[0, 1].item()) and rank0 == 2
    assert lp1 == pytest.approx(expected[1, 0].item()) and rank1 == 2  # ties count as not more likely
    assert list(top0) == [0, 1] and top0[0] == pytest.approx(expected[0, 0].item())
    assert list(top1)[0] == 2 and len(top1) == 2
    assert [top for _, _, top in prompt_logprobs(logits, [1, 0], 0)] == [{}, {}]
    assert prompt_logprobs(logits[:0], [], 3) == []
