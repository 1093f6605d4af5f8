"""The generation engine: greedy vs recompute, seeded sampling, request validation, metrics."""
import itertools
import re

import pytest
import torch

from masep import build_model, preset
from masep.engine import Request, generate, mask_top_k_top_p, random_prompts, validate_request
from masep.metrics import RequestOutput, compute_metrics
from masep.runtime import LocalRuntime

CFG = preset("tiny")


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


@pytest.fixture
def runtime(model):
    return LocalRuntime(model)


def _recompute_argmax(model, prompt, tokens):
    """argmax of a full, cache-free forward over prompt + tokens at every generated position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)].argmax(-1).tolist()


@pytest.mark.timeout(60)
def test_random_prompts_are_a_function_of_the_seed():
    a = random_prompts(3, 5, 100, seed=1)
    assert a == random_prompts(3, 5, 100, seed=1) != random_prompts(3, 5, 100, seed=2)
    assert len(a) == 3 and all(len(p) == 5 and all(0 <= t < 100 for t in p) for p in a)


@pytest.mark.timeout(60)
def test_greedy_matches_full_recompute(model, runtime):
    """Rows of different prompt lengths and different max_new_tokens in one batch: rows that
    finish early keep running with frozen positions and must not disturb the others."""
    prompts = random_prompts(4, 11, CFG.vocab_size, seed=0)
    requests = [Request(prompts[0], 6), Request(prompts[1][:3], 1), Request(prompts[2][:7], 9),
                Request(prompts[3][:1], 4)]
    result = generate(runtime, requests)
    for req, out in zip(requests, result.outputs):
        assert out.error is None and out.finish_reason == "length"
        assert len(out.tokens) == req.max_new_tokens
        # Exact equality: logits differ from the recompute by ~1e-7 (test_model), and with random
        # weights the top two logits of these rows are far further apart than that.
        assert out.tokens == _recompute_argmax(model, req.prompt, out.tokens)


def _sampled(prompt, seed, **kw):
    return Request(prompt, 8, temperature=kw.pop("temperature", 1.0), seed=seed, **kw)


@pytest.mark.timeout(60)
def test_sampling_is_reproducible_and_independent_of_the_batch(runtime):
    prompts = random_prompts(4, 9, CFG.vocab_size, seed=5)
    target = _sampled(prompts[0], seed=11, top_p=0.9, top_k=50)
    alone = generate(runtime, [target]).tokens[0]
    assert generate(runtime, [target]).tokens[0] == alone
    # Other rows: longer and shorter prompts, greedy and sampled neighbours, target not first.
    others = [Request(prompts[1], 3), _sampled(prompts[2][:2], seed=11), _sampled(prompts[3] + prompts[1], seed=4)]
    mixed = generate(runtime, [others[0], target, *others[1:]]).tokens[1]
    assert mixed == alone
    assert generate(runtime, [_sampled(prompts[0], seed=12, top_p=0.9, top_k=50)]).tokens[0] != alone


@pytest.mark.timeout(60)
def test_filters_that_keep_one_token_reduce_to_greedy(runtime):
    prompts = random_prompts(2, 6, CFG.vocab_size, seed=6)
    greedy = generate(runtime, [Request(p, 6) for p in prompts]).tokens
    top_k_1 = generate(runtime, [_sampled(p, seed=i, top_k=1) for i, p in enumerate(prompts)]).tokens
    top_p_min = generate(runtime, [_sampled(p, seed=i, top_p=1e-6) for i, p in enumerate(prompts)]).tokens
    assert [t[:6] for t in top_k_1] == greedy == [t[:6] for t in top_p_min]


@pytest.mark.timeout(60)
def test_mask_top_k_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15], [0.1, 0.5, 0.2, 0.2], [0.1, 0.5, 0.3, 0.1], [0.25] * 4])
    logits = probs.log()
    top_k, top_p = torch.tensor([2, 0, 0, 0]), torch.tensor([1.0, 0.5, 0.75, 1.0])
    kept = mask_top_k_top_p(logits, top_k, top_p).isfinite()
    assert kept.tolist() == [
        [False, True, True, False],  # top-2
        [False, True, False, False],  # 0.5 alone reaches top_p = 0.5
        [False, True, True, False],  # 0.5 + 0.3 >= 0.75
        [True] * 4,  # both off
    ]


@pytest.mark.timeout(60)
def test_sampled_tokens_stay_inside_top_k(model, runtime):
    prompt = random_prompts(1, 5, CFG.vocab_size, seed=7)[0]
    out = generate(runtime, [_sampled(prompt, seed=s, top_k=3, temperature=5.0) for s in range(6)])
    with torch.no_grad():
        first_logits = model(torch.tensor([prompt]))[0, -1]
    allowed = set(first_logits.topk(3).indices.tolist())
    firsts = {t[0] for t in out.tokens}
    assert firsts <= allowed and len(firsts) > 1  # at temperature 5 the draws spread over the 3


BAD = {
    "empty prompt": (Request([], 4), "prompt is empty"),
    "token >= vocab": (Request([1, 256], 4), r"prompt\[1\]=256: .*\[0, vocab_size=256\)"),
    "negative token": (Request([-1], 4), r"prompt\[0\]=-1"),
    "too long": (Request([1] * 250, 7), r"prompt of 250 tokens \+ max_tokens 7 = 257 exceeds the maximum model length 256"),
    "no new tokens": (Request([1], 0), r"max_tokens=0: must be an integer >= 1"),
    "negative temperature": (Request([1], 2, temperature=-0.5), r"temperature=-0.5: must be >= 0"),
    "top_p zero": (Request([1], 2, top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
    "top_p above one": (Request([1], 2, top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
    "negative top_k": (Request([1], 2, top_k=-2), r"top_k=-2: must be an integer >= -1"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_request_fails_alone_and_the_others_complete(runtime, name):
    bad, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        validate_request(bad, CFG)
    good = Request(random_prompts(1, 5, CFG.vocab_size, seed=8)[0], 3)
    result = generate(runtime, [good, bad, good])
    assert result.outputs[1].error is not None and result.outputs[1].tokens == []
    assert re.search(pattern, result.outputs[1].error)
    assert result.tokens[0] == result.tokens[2] == generate(runtime, [good]).tokens[0]
    assert (result.metrics.completed, result.metrics.failed) == (2, 1)


class NoWorkRuntime:
    cfg, device = CFG, torch.device("cpu")

    def __getattr__(self, name):
        raise AssertionError(f"runtime.{name} called although every request was rejected")


@pytest.mark.timeout(60)
def test_all_bad_requests_do_no_work():
    result = generate(NoWorkRuntime(), [Request([], 1), Request([1], 0)])
    assert [o.error is not None for o in result.outputs] == [True, True]
    assert (result.metrics.completed, result.metrics.failed, result.metrics.total_output_tokens) == (0, 2, 0)


@pytest.mark.timeout(60)
def test_stop_on_eos(model, runtime):
    prompt = random_prompts(1, 6, CFG.vocab_size, seed=9)[0]
    free = generate(runtime, [Request(prompt, 8)]).tokens[0]
    eos = free[3]
    cut = free[:free.index(eos) + 1]
    runtime.cfg = CFG.replace(eos_token_id=eos)
    result = generate(runtime, [Request(prompt, 8), Request(prompt[:2], 8)], stop_on_eos=True)
    assert result.tokens[0] == cut and result.outputs[0].finish_reason == "stop"
    assert len(result.outputs[0].token_times_s) == len(cut)
    assert generate(runtime, [Request(prompt, 8)]).tokens[0] == free  # off by default
    runtime.cfg = CFG
    with pytest.raises(ValueError, match="eos_token_id=None"):
        generate(runtime, [Request(prompt, 8)], stop_on_eos=True)


# --- metrics -------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_metrics_definitions():
    outs = [RequestOutput(4, tokens=[1, 2, 3], token_times_s=[0.1, 0.3, 0.5]),  # TPOT 0.2
            RequestOutput(2, tokens=[1, 2], token_times_s=[0.2, 0.3]),  # TPOT 0.1
            RequestOutput(3, tokens=[1], token_times_s=[0.4]),  # one token: no TPOT (vLLM)
            RequestOutput(5, error="bad")]
    m = compute_metrics(outs, duration_s=0.5)
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (3, 1, 9, 6)
    assert m.mean_ttft_ms == pytest.approx(1e3 * (0.1 + 0.2 + 0.4) / 3)
    assert m.median_ttft_ms == pytest.approx(200)
    assert m.mean_tpot_ms == pytest.approx(150) and m.median_tpot_ms == pytest.approx(150)
    assert m.p99_tpot_ms == pytest.approx(100 + 0.99 * 100)  # numpy's linear percentile
    assert m.mean_itl_ms == pytest.approx(1e3 * (0.2 + 0.2 + 0.1) / 3)
    assert m.mean_e2el_ms == pytest.approx(1e3 * (0.5 + 0.3 + 0.4) / 3)
    assert m.output_throughput == pytest.approx(6 / 0.5) and m.request_throughput == pytest.approx(3 / 0.5)
    assert m.total_token_throughput == pytest.approx(15 / 0.5)
    empty = compute_metrics([RequestOutput(1, error="bad")], 0.0)
    assert empty.mean_tpot_ms == 0.0 and empty.output_throughput == 0.0  # vLLM reports 0 for none


@pytest.mark.timeout(60)
def test_engine_timestamps_with_a_fake_clock(runtime):
    """The clock is read once at start, once per token step, once at stop: with a clock that
    ticks 1 s per read, request i's tokens land at 1, 2, ..., n_i seconds."""
    ticks = itertools.count()
    prompts = random_prompts(2, 4, CFG.vocab_size, seed=10)
    result = generate(runtime, [Request(prompts[0], 5), Request(prompts[1], 2)], clock=lambda: float(next(ticks)))
    a, b = result.outputs
    assert a.token_times_s == [1.0, 2.0, 3.0, 4.0, 5.0] and b.token_times_s == [1.0, 2.0]
    assert (a.ttft_s, a.e2e_s, a.tpot_s, b.tpot_s) == (1.0, 5.0, 1.0, 1.0)
    m = result.metrics
    assert m.duration_s == 6.0 and m.output_throughput == pytest.approx(7 / 6.0)
    assert m.mean_ttft_ms == 1000.0 and m.mean_tpot_ms == 1000.0 and m.mean_e2el_ms == 3500.0


@pytest.mark.parametrize("slots,tokens,starts,bad", [
    ([0, 5], [[1], [2]], [3, 4], "slot 5"),  # slot past the cache
    ([0, 1], [[1], []], [3, 4], "0 tokens"),  # an empty row
    ([0, 1], [[1], [2, 3]], [3, -1], "start -1"),  # a negative position
    ([0, 1], [[1], [2, 3]], [3, 15], "start 15, 2 tokens"),  # past max_len
])
def test_step_rows_check_names_the_first_bad_row(slots, tokens, starts, bad):
    """StepRows.check (vectorised for the host's step preparation) still names the bad row."""
    from masep.runtime import StepRows
    StepRows([0, 1], [[1], [2, 3]], [3, 14]).check(4, 16)  # in range: no error
    with pytest.raises(AssertionError, match=re.escape(bad)):
        StepRows(slots, tokens, starts).check(4, 16)


def test_decode_lay_out_places_each_row_at_its_slot():
    """lay_out of a decode step over slots [3, 0] with a 6-row bucket: ids and positions at the
    slots, padding rows at the scratch position, logits of row b from slot b's row."""
    from masep.runtime import StepRows, lay_out
    rows = StepRows([3, 0], [[7], [9]], [5, 2])
    st = lay_out(rows, 99, torch.device("cpu"), 6)
    assert st.ids_BT[:, 0].tolist() == [9, 0, 0, 7, 0, 0]
    assert st.positions_BT[:, 0].tolist() == [2, 99, 99, 5, 99, 99]
    assert st.logit_rows_B.tolist() == [3, 0] and st.attend_len == 6 and st.decode
