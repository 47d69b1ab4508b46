"""Packing: encoded sessions into rows of at most `max_len` tokens, and rows into steps.

Several sessions share one row, so no compute goes to padding. Inside a row, position ids
restart at 0 for each session and a per-token document id lets the model's attention stay
within its own session (the model's document mask), so a packed row computes exactly what
the sessions would compute one by one.

The order is a pure function of (lengths, max_len, batch_tokens, seed, epoch): a run that
resumes at step N recomputes the same plan and picks up the same rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sekft.errors import DataError

IGNORE = -100

# First-fit looks for room among this many open rows only: O(n) instead of O(n * rows), and
# in practice as dense as unbounded first-fit once there are more sessions than this.
OPEN_ROWS = 32


@dataclass(frozen=True)
class Example:
    """One encoded session: `input_ids` and unshifted `labels` (IGNORE where nothing trains).

    `source` names where it came from ("file.jsonl:12") for messages about it.
    """

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """Tokens that train after the shift: a label at position 0 has no prediction."""
        return sum(1 for y in self.labels[1:] if y != IGNORE)


def drop_overlong(
    examples: list[Example], max_len: int, strict: bool = False
) -> tuple[list[Example], list[Example]]:
    """Split `examples` into (those of at most `max_len` tokens, those longer).

    Sessions are never cut: a cut session trains on a prefix the model is never served.
    With `strict`, any overlong session raises DataError naming it instead.
    """
    kept = [e for e in examples if len(e) <= max_len]
    dropped = [e for e in examples if len(e) > max_len]
    if strict and dropped:
        e = dropped[0]
        raise DataError(
            f"{e.source}: session is {len(e)} tokens, longer than --max-len {max_len} "
            f"({len(dropped)} such sessions); raise --max-len or drop --strict to skip them"
        )
    return kept, dropped


def pack_rows(lengths: list[int], max_len: int, rng: random.Random) -> list[list[int]]:
    """Group example indices into rows whose lengths sum to at most `max_len`.

    Contract: every index of `lengths` appears in exactly one row; each row's total length is
    <= max_len (every length must be <= max_len and > 0). Examples are visited in an order
    shuffled by `rng`, each placed in the first open row with room (first-fit over the
    `OPEN_ROWS` most recent rows), and the rows are shuffled again so that the rows first-fit
    filled early do not always come first.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    closed: list[list[int]] = []
    open_rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if not 0 < n <= max_len:
            raise ValueError(f"length {n} of example {i} is not in 1..{max_len}")
        slot = next((k for k, r in enumerate(room) if r >= n), None)
        if slot is None:
            if len(open_rows) == OPEN_ROWS:
                closed.append(open_rows.pop(0))
                room.pop(0)
            open_rows.append([])
            room.append(max_len)
            slot = len(open_rows) - 1
        open_rows[slot].append(i)
        room[slot] -= n
    rows = closed + open_rows
    rng.shuffle(rows)
    return rows


def group_steps(row_lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group consecutive rows into optimizer steps of at most `batch_tokens` tokens each.

    Contract: returns lists of row indices covering 0..len(row_lengths)-1 in order; a step
    takes rows while their total stays <= batch_tokens, and always at least one row (a row
    longer than batch_tokens is a step of its own).
    """
    steps: list[list[int]] = []
    total = 0
    for i, n in enumerate(row_lengths):
        if steps and total + n <= batch_tokens:
            steps[-1].append(i)
            total += n
        else:
            steps.append([i])
            total = n
    return steps


def plan_epoch(
    lengths: list[int], max_len: int, batch_tokens: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """The steps of one epoch: each step a list of rows, each row a list of example indices.

    Deterministic in its arguments (the shuffle is seeded by the string "seed:epoch", which
    Python hashes the same way in every process).
    """
    rng = random.Random(f"{seed}:{epoch}")
    rows = pack_rows(lengths, max_len, rng)
    row_lengths = [sum(lengths[i] for i in row) for row in rows]
    return [[rows[r] for r in step] for step in group_steps(row_lengths, batch_tokens)]


def plan_steps(
    lengths: list[int], max_len: int, batch_tokens: int, seed: int, epochs: int
) -> list[list[list[int]]]:
    """`plan_epoch` for epochs 0..epochs-1, concatenated: the whole run's data order."""
    return [
        step
        for epoch in range(epochs)
        for step in plan_epoch(lengths, max_len, batch_tokens, seed, epoch)
    ]


@dataclass(frozen=True)
class Row:
    """A packed row as the model takes it, every tensor [1, T] of int64.

    `labels` are unshifted, IGNORE at each session's first token so no position predicts
    across a session boundary; `n_trained` counts labels[1:] that train.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    n_trained: int

    def to(self, device: torch.device | str) -> Row:
        return Row(
            self.input_ids.to(device),
            self.labels.to(device),
            self.position_ids.to(device),
            self.doc_ids.to(device),
            self.n_trained,
        )


def collate_row(examples: list[Example]) -> Row:
    """Concatenate `examples` into one Row (T = their total length, no padding)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    doc_ids: list[int] = []
    for doc, e in enumerate(examples):
        input_ids += e.input_ids
        labels += [IGNORE] + e.labels[1:]
        position_ids += range(len(e))
        doc_ids += [doc] * len(e)
    n_trained = sum(1 for y in labels[1:] if y != IGNORE)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).unsqueeze(0)

    return Row(tensor(input_ids), tensor(labels), tensor(position_ids), tensor(doc_ids), n_trained)
