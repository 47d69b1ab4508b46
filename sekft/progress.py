"""Progress lines of training and eval: redrawn in place on a terminal, one plain line per
update otherwise."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # sekft-eval shows progress too, and must not wait for torch to import
    import torch


def format_duration(seconds: float) -> str:
    """Seconds as "45s", "4m05s" or "2h03m"; "?" for a negative or infinite value."""
    if not 0 <= seconds < float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: int) -> str:
    """A byte count in MB below 1 GB, else GB, one decimal."""
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def format_progress(
    step: int, total: int, loss: float, tokens_per_s: float, eta_s: float, memory: int,
    peak: int | None = None,
) -> str:
    """One progress line: "step 12/300  loss 1.2345  1234 tok/s  ETA 4m05s  mem 1.2 GB", and
    "(peak 1.5 GB)" after it when `peak` is given."""
    return (
        f"step {step}/{total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s  "
        f"ETA {format_duration(eta_s)}  mem {format_bytes(memory)}"
        + (f" (peak {format_bytes(peak)})" if peak is not None else "")
    )


def format_eval_progress(done: int, total: int, passed: dict[str, tuple[int, int]],
                         errors: int, eta_s: float) -> str:
    """One eval progress line: "episode 7/20  adapter pass 3/5  base pass 1/2  ETA 2m10s",
    `passed` mapping each run to (passed, judged) so far; scenario errors, judged in no run,
    are counted when there are any."""
    runs = "".join(f"  {run} pass {k}/{n}" for run, (k, n) in passed.items())
    failed = f"  {errors} scenario error{'s' * (errors != 1)}" if errors else ""
    return f"episode {done}/{total}{runs}{failed}  ETA {format_duration(eta_s)}"


def peak_memory(device: torch.device) -> int:
    """Peak bytes so far: CUDA allocator peak on a GPU, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_memory(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated on a GPU, else the process's resident set (RSS).

    Unlike the peak, it can fall: a step that ends higher than the one before means memory
    still held (a leak, or freed memory the C heap keeps), not one long row.
    """
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # no /proc (macOS): the peak is all there is
        return peak_memory(device)


class ProgressLine:
    """Shows progress lines: over each other on a TTY, as separate lines elsewhere (logs, CI).

    With `report`, lines go to `report(line, **fields)` instead of the stream (the resident
    server streams them to its client).
    """

    def __init__(
        self, stream: TextIO | None = None, report: Callable[..., None] | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.report = report
        self.tty = self.stream.isatty() and report is None
        self.drawn = False

    def update(self, line: str, fields: dict | None = None) -> None:
        """Replace the live line (TTY) or print it as a line of its own."""
        if self.report is not None:
            self.report(line, **(fields or {}))
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, line: str) -> None:
        """Print a line that stays (an eval result, a saved checkpoint) above the live line."""
        if self.report is not None:
            self.report(line)
            return
        if self.drawn:
            self.stream.write("\r\x1b[2K")
            self.drawn = False
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
