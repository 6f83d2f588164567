"""ppn.speed: the arithmetic of throughput and of interleaved speed ratios (no speed targets here)."""

import time

from ppn import speed
from ppn.testing import tiny_model


def test_interleaved_ratio_is_reference_time_over_model_time(monkeypatch):
    # A fake clock: the reference takes 2 ticks, the model 1, except one slow spell
    # of 7 extra ticks in the model's first timed call, which the median ignores.
    now, calls = [0.0], [0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def model():
        calls[0] += 1
        now[0] += 1 + (7 if calls[0] == 2 else 0)  # call 1 is the untimed warm-up

    def reference():
        now[0] += 2

    assert speed.interleaved_ratio(model, reference, repeats=5) == 2.0


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
