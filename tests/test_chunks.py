"""chunks.over_chunks: every piece once, on two threads; the sums and updates built on it are unchanged."""
import threading

import numpy as np
import pytest

from tinyllm_np import chunks
from tinyllm_np.chunks import over_chunks
from tinyllm_np.parallel import sum_in_order


def test_every_piece_once_in_two_threads(monkeypatch):
    monkeypatch.setattr(chunks, "_cores", lambda: 2)
    seen, lock = [], threading.Lock()

    def fn(s, e):
        with lock:
            seen.append((s, e, threading.get_ident()))

    over_chunks(fn, 23, 5)  # pieces of 5 and a ragged end of 3
    assert sorted((s, e) for s, e, _ in seen) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    here = threading.get_ident()
    assert {t for s, _, t in seen if s < 15} == {here}  # the first half here
    assert {t for s, _, t in seen if s >= 15} - {here}  # the second half on the helper


def test_one_core_or_one_piece_stays_on_this_thread(monkeypatch):
    here = threading.get_ident()
    for cores, n in ((1, 23), (2, 5)):
        monkeypatch.setattr(chunks, "_cores", lambda: cores)
        seen = []
        over_chunks(lambda s, e: seen.append((s, e, threading.get_ident())), n, 5)
        assert [(s, e) for s, e, _ in seen] == [(s, min(s + 5, n)) for s in range(0, n, 5)]
        assert {t for *_, t in seen} == {here}


def test_an_error_in_either_half_is_raised_after_both_stop(monkeypatch):
    monkeypatch.setattr(chunks, "_cores", lambda: 2)
    # pieces 0, 5, 10 here, 15, 20 on the helper; each half stops at its own failing piece
    for bad, ran in ((0, {15, 20}), (20, {0, 5, 10, 15})):
        done = []

        def fn(s, e):
            if s == bad:
                raise ValueError(f"piece {s}")
            done.append(s)

        with pytest.raises(ValueError, match=f"piece {bad}"):
            over_chunks(fn, 25, 5)
        assert set(done) == ran  # the other half had finished when the error came through


@pytest.mark.parametrize("chunk", [3, 65536])
def test_sum_in_order_is_the_left_to_right_sum_bit_for_bit(monkeypatch, chunk):
    monkeypatch.setattr(chunks, "_cores", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK", chunk)
    rows = (np.random.default_rng(0).standard_normal((5, 17)) * 10.0 ** np.arange(5)[:, None]).astype(np.float32)
    want = rows[0].copy()
    for r in rows[1:]:
        want = want + r
    got = sum_in_order(rows)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert not np.shares_memory(sum_in_order(rows[:1]), rows)


def test_default_pieces_are_equal_and_even_in_number():
    """piece_length: the fewest equal pieces of at most CHUNK, an even count, so both threads get the same share."""
    for n, chunk, want in ((818176, 262144, 204544), (626560, 262144, 156640), (262144, 262144, 262144),
                           (10, 262144, 10), (17, 3, 3)):
        got = chunks.piece_length(n, chunk)
        assert got == want
        count = -(-n // got)
        assert got <= chunk and (count == 1 or count % 2 == 0)
        assert count * got - n < count  # equal pieces, but for rounding in the last
    assert chunks.piece_length(0) == 1  # nothing to cut: no zero-length step


def test_over_chunks_default_is_piece_length(monkeypatch):
    monkeypatch.setattr(chunks, "_cores", lambda: 2)
    monkeypatch.setattr(chunks, "CHUNK", 4)
    seen = []
    over_chunks(lambda s, e: seen.append((s, e)), 10)  # 3 pieces of at most 4 -> 4 pieces of 3
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]
