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


def test_default_pieces_are_near_equal_and_even_in_number(monkeypatch):
    """piece_count: the fewest pieces of at most CHUNK, an even count, cut near-equal, so both threads get the same share."""
    monkeypatch.setattr(chunks, "_cores", lambda: 1)  # in order, on this thread
    for n, chunk, count in ((818176, 262144, 4), (626560, 262144, 4), (262144, 262144, 1), (10, 262144, 1),
                            (9, 4, 4), (17, 3, 6), (3, 1, 3), (0, 4, 0)):
        monkeypatch.setattr(chunks, "CHUNK", chunk)
        seen = []
        over_chunks(lambda s, e: seen.append((s, e)), n)
        assert len(seen) == count
        assert not seen or ([s for s, _ in seen] == [0] + [e for _, e in seen[:-1]] and seen[-1][1] == n)
        sizes = [e - s for s, e in seen]
        assert all(0 < x <= chunk for x in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)
