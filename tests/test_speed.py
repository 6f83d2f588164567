"""ppn.speed: the arithmetic of throughput and of interleaved speed ratios (no speed targets here)."""

import time

from ppn import speed
from ppn.testing import tiny_model


def test_interleaved_ratio_is_reference_time_over_model_time():
    # 40 ms against 20 ms: the model is twice as fast, whatever else the machine does
    # between the rounds (sleep only ever overshoots, so the bounds are loose).
    ratio = speed.interleaved_ratio(lambda: time.sleep(0.02), lambda: time.sleep(0.04), repeats=5)
    assert 1.5 < ratio < 2.5


def test_interleaved_ratio_alternates_the_two_calls():
    calls = []
    speed.interleaved_ratio(lambda: calls.append("model"), lambda: calls.append("reference"), repeats=3)
    assert calls == ["model", "reference"] + ["reference", "model"] * 3


def test_throughput_counts_tokens_and_relative_speed_of_a_model_to_itself():
    model = tiny_model()
    prefill = speed.prefill_throughput(model, batch=2, seqlen=16, repeats=2)
    assert prefill.tokens == 32 and prefill.tokens_per_second == prefill.tokens / prefill.seconds
    decode = speed.decode_throughput(model, prompt_len=4, new_tokens=6, repeats=1)
    assert decode.tokens == 6 and decode.repeats == 1
    ratios = speed.relative_speed(model, model, repeats=3, prefill=dict(batch=2, seqlen=16),
                                  decode=dict(prompt_len=4, new_tokens=6))
    assert set(ratios) == {"prefill_ratio", "decode_ratio"}
    assert all(0 < r < 100 for r in ratios.values())
