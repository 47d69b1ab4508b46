"""Packing: sessions into rows of at most max_len, rows into steps, deterministic by seed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sekft.errors import DataError
from sekft.pack import (
    IGNORE,
    Example,
    collate_row,
    drop_overlong,
    group_steps,
    pack_rows,
    plan_epoch,
    plan_steps,
)

lengths_strategy = st.lists(st.integers(1, 64), min_size=0, max_size=200)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, seed=st.integers(0, 2**32))
def test_pack_rows_places_every_example_exactly_once_within_max_len(lengths, seed):
    rows = pack_rows(lengths, 64, random.Random(seed))
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=50, max_size=200), seed=st.integers(0, 99))
def test_pack_rows_fills_rows_densely(lengths, seed):
    rows = pack_rows(lengths, 64, random.Random(seed))
    # A row is only opened (or closed) when the example at hand, <= 16 tokens, fits nowhere
    # else, so every row but the last holds at least 48 of its 64 tokens.
    lower_bound = -(-sum(lengths) // 64)
    assert len(rows) <= lower_bound * 64 // 48 + 2


def test_pack_rows_rejects_an_example_longer_than_max_len():
    with pytest.raises(ValueError, match="not in 1..8"):
        pack_rows([3, 9], 8, random.Random(0))


def test_plan_epoch_is_deterministic_given_seed_and_epoch():
    lengths = [random.Random(1).randint(1, 30) for _ in range(100)]
    assert plan_epoch(lengths, 64, 128, seed=7, epoch=2) == plan_epoch(
        lengths, 64, 128, seed=7, epoch=2
    )


def test_plan_epoch_order_changes_with_seed_and_with_epoch():
    lengths = [5] * 100
    base = plan_epoch(lengths, 64, 128, seed=7, epoch=0)
    assert plan_epoch(lengths, 64, 128, seed=8, epoch=0) != base
    assert plan_epoch(lengths, 64, 128, seed=7, epoch=1) != base


def test_plan_steps_covers_every_example_once_per_epoch():
    lengths = [3, 10, 7, 1, 12, 9]
    steps = plan_steps(lengths, 16, 32, seed=0, epochs=3)
    seen = sorted(i for step in steps for row in step for i in row)
    assert seen == sorted(list(range(6)) * 3)


@settings(max_examples=60, deadline=None)
@given(row_lengths=st.lists(st.integers(1, 100), max_size=50), batch=st.integers(1, 300))
def test_group_steps_keeps_rows_in_order_under_the_token_budget(row_lengths, batch):
    steps = group_steps(row_lengths, batch)
    assert [i for s in steps for i in s] == list(range(len(row_lengths)))
    for s in steps:
        assert len(s) == 1 or sum(row_lengths[i] for i in s) <= batch


def test_group_steps_gives_an_oversized_row_a_step_of_its_own():
    assert group_steps([5, 50, 5, 5], 20) == [[0], [1], [2, 3]]


def test_collate_row_restarts_positions_and_numbers_documents():
    a = Example([1, 2, 3], [IGNORE, 2, 3])
    b = Example([4, 5], [IGNORE, 5])
    row = collate_row([a, b])
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert row.doc_ids.tolist() == [[0, 0, 0, 1, 1]]


def test_collate_row_never_trains_a_prediction_across_a_session_boundary():
    # b's first label would be predicted from a's last token: it must not train.
    a = Example([1, 2], [IGNORE, 2])
    b = Example([4, 5], [4, 5])
    row = collate_row([a, b])
    assert row.labels.tolist() == [[IGNORE, 2, IGNORE, 5]]
    assert row.n_trained == a.n_trained + b.n_trained == 2


def test_example_n_trained_ignores_a_label_at_position_zero():
    assert Example([1, 2, 3], [1, IGNORE, 3]).n_trained == 1


def test_drop_overlong_keeps_sessions_up_to_max_len_and_returns_the_rest():
    short, exact, long = (Example([1] * n, [1] * n) for n in (3, 4, 5))
    kept, dropped = drop_overlong([short, exact, long], 4)
    assert kept == [short, exact]
    assert dropped == [long]


def test_drop_overlong_under_strict_names_the_session_and_the_limit():
    long = Example([1] * 5, [1] * 5, source="data/a.jsonl:3")
    with pytest.raises(DataError, match=r"data/a.jsonl:3: session is 5 tokens.*--max-len 4"):
        drop_overlong([long], 4, strict=True)
