"""Training and inspection data: sessions read from JSONL.

Each line of a `.jsonl` file is one session:
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...], ...}
Other fields of the line are kept in `Session.extra`; other keys of a message are kept too.
A path is a file, or a folder whose `*.jsonl` files (recursively, in sorted path order) are
read one after the other. Blank lines are skipped. Anything malformed raises DataError naming
the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sekft.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Session:
    """One conversation and where it came from (file and 1-based line)."""

    messages: list[dict]
    source_file: str
    source_line: int
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source_file}:{self.source_line}"


def check_messages(messages: object, where: str) -> list[dict]:
    """`messages` if it is a non-empty list of {role, content} objects, else DataError.

    An assistant turn may carry OpenAI's fine-tuning key `weight`: 1 trains it (the default),
    0 keeps it in the context untrained (a step shown, not taught).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages': expected a non-empty list of "
                        f"{{role, content}} objects, got {json.dumps(messages)[:60]}")
    for n, message in enumerate(messages):
        at = f"{where}: field 'messages[{n}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}': expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}.role': expected one of {list(ROLES)}, got {json.dumps(role)}")
        if not isinstance(content, str):
            raise DataError(f"{at}.content': expected a string, got {json.dumps(content)[:60]}")
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)
                                    or isinstance(message["weight"], bool)):
            raise DataError(f"{at}.weight': expected 0 or 1 on an assistant turn, got "
                            f"{json.dumps(message['weight'])[:20]} on a {role} turn")
    return messages


def read_jsonl(path: Path) -> list[Session]:
    """The sessions of one JSONL file."""
    sessions = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno}); each line must "
                            "be one JSON object") from e
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a 'messages' field")
        if "messages" not in record:
            raise DataError(f"{where}: field 'messages': missing")
        messages = check_messages(record.pop("messages"), where)
        sessions.append(Session(messages, str(path), number, record))
    return sessions


def read_sessions(path: str | Path) -> list[Session]:
    """Every session in a JSONL file or a folder of them, in order.

    Raises DataError when the path is missing, holds no `.jsonl` file, or has no session.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: folder has no *.jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    sessions = [s for file in files for s in read_jsonl(file)]
    if not sessions:
        raise DataError(f"{path}: no sessions (every line is blank)")
    return sessions
