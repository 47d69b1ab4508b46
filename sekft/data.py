"""Training and inspection data: sessions read from JSONL.

Each line of a `.jsonl` file is one session:
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...], ...}
Other fields of the line are kept in `Session.extra`; other keys of a message are kept too.
A path is a file, or a folder whose `*.jsonl` and `*.jsonl.gz` files (recursively, in sorted
path order, skipping hidden files and folders such as `.ipynb_checkpoints/` or macOS `._x`)
are read one after the other. A file may be gzip-compressed (`.jsonl.gz`, recognised by its
magic bytes) and may start with a UTF-8 BOM; lines end at "\\n" only (JSON Lines), so an
unescaped U+2028 or U+0085 inside a string stays in its line. Blank lines are skipped.

Two OpenAI chat forms are mapped to the plain one, as documented by OpenAI and served by vLLM:
a `content` given as a list of text parts ([{"type": "text", "text": "..."}]) becomes their
texts joined by "\\n" (vLLM's string content format), and the role `developer` (OpenAI's
successor of `system`) becomes `system`. Tool calling is refused, never guessed: sekft trains
plain shell sessions, where what the environment printed is a `user` turn.

Anything malformed raises DataError naming the file, the line and the field.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from sekft.errors import DataError

ROLES = ("system", "user", "assistant")
# OpenAI's `developer` role is the `system` role under a new name (its reasoning models).
ROLE_ALIASES = {"developer": "system"}
# Roles and keys of tool calling: a different protocol, refused with this explanation.
TOOL_ROLES = ("tool", "function", "ipython")
TOOL_KEYS = ("tool_calls", "function_call")
NO_TOOLS = ("sekft trains plain shell sessions: the command is an assistant turn and what the "
            "environment printed is a 'user' turn (no tool calls)")
# The first bytes of a gzip stream; JSON text never starts with them.
GZIP_MAGIC = b"\x1f\x8b"
DATA_PATTERNS = ("*.jsonl", "*.jsonl.gz")
# Other formats' keys, named when 'messages' is missing (the error says what was found).
FOREIGN_FORMATS = {
    "prompt": "OpenAI's prompt/completion format",
    "completion": "OpenAI's prompt/completion format",
    "conversations": "the ShareGPT format",
    "instruction": "the Alpaca format",
}


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


def message_text(content: object, at: str) -> str:
    """The text of a message's `content`: a string as it is, or a list of OpenAI text parts
    ({"type": "text", "text": str}) joined by "\\n", as vLLM joins them before the template.

    Any other value, or a part of another type (an image...), is a DataError naming `at`
    (the field, e.g. "f.jsonl:3: field 'messages[1]").
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise DataError(f"{at}.content': expected a string, got {json.dumps(content)[:60]}")
    texts = []
    for k, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise DataError(f"{at}.content[{k}]': expected a text part "
                            f'{{"type": "text", "text": "..."}}, got {json.dumps(part)[:60]}')
        texts.append(part["text"])
    return "\n".join(texts)


def check_messages(messages: object, where: str) -> list[dict]:
    """`messages` as a non-empty list of {role, content} objects (content a string), else
    DataError.

    Returns new message dicts, other keys kept, with the two OpenAI forms of the module
    docstring mapped (content parts joined, `developer` as `system`). An assistant turn may
    carry OpenAI's fine-tuning key `weight`: 1 trains it (the default), 0 keeps it in the
    context untrained (a step shown, not taught).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages': expected a non-empty list of "
                        f"{{role, content}} objects, got {json.dumps(messages)[:60]}")
    checked = []
    for n, message in enumerate(messages):
        at = f"{where}: field 'messages[{n}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}': expected an object with 'role' and 'content'")
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role in TOOL_ROLES:
            raise DataError(f"{at}.role': {json.dumps(role)} turns are not supported; {NO_TOOLS}")
        if role not in ROLES:
            raise DataError(f"{at}.role': expected one of {list(ROLES)}, got "
                            f"{json.dumps(message.get('role'))}")
        tool_key = next((k for k in TOOL_KEYS if message.get(k)), None)
        if tool_key is not None:
            # The call would be dropped from the render: a silent loss, so refuse it.
            raise DataError(f"{at}.{tool_key}': tool calls are not supported; {NO_TOOLS}")
        content = message_text(message.get("content"), at)
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)
                                    or isinstance(message["weight"], bool)):
            weight = json.dumps(message["weight"])[:20]
            raise DataError(f"{at}.weight': " + (
                f"expected 0 or 1 on an assistant turn, got {weight} on a {role} turn"
                if role != "assistant" else
                f"expected 0 or 1 (1 trains the turn, 0 shows it untrained), got {weight}"))
        checked.append({**message, "role": role, "content": content})
    return checked


def decode_lines(path: Path, raw: bytes) -> list[str]:
    """The text lines of a data file's bytes: gunzipped if gzip, a leading UTF-8 BOM dropped,
    split at "\\n" only (str.splitlines would also split at U+2028, U+0085 and other
    characters that JSON writers leave unescaped inside strings)."""
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + 3 * raw.startswith(b"\xef\xbb\xbf")
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[start]:#04x} at byte column "
                        f"{column}); save the file as UTF-8") from None
    return text.split("\n")


def whole_file_hint(path: Path, lines: list[str]) -> str | None:
    """What the file is when it is one JSON document over several lines, or a JSON array
    (a `.json` export), rather than JSON Lines; None when it is not."""
    try:
        whole = json.loads("\n".join(lines))
    except json.JSONDecodeError:
        return None
    if isinstance(whole, list):
        what = "a JSON array"
        convert = f"jq -c '.[]' {path} > {path.stem}.jsonl"
    elif isinstance(whole, dict) and sum(bool(line.strip()) for line in lines) > 1:
        what = "one JSON object over several lines"
        convert = f"jq -c . {path} > {path.stem}.jsonl"
    else:
        return None
    return (f"{path}: {what}, not JSON Lines: sekft reads one session object per line; "
            f"convert it with `{convert}`")


def missing_messages(record: dict, where: str) -> DataError:
    """The error for a line without 'messages', naming the other format it looks like."""
    known = [FOREIGN_FORMATS[k] for k in record if k in FOREIGN_FORMATS]
    looks = (f" (this line looks like {known[0]}; sekft reads chat sessions "
             '{"messages": [{"role", "content"}, ...]})') if known else ""
    return DataError(f"{where}: field 'messages': missing{looks}")


def read_jsonl(path: Path) -> list[Session]:
    """The sessions of one JSONL file (gzip-compressed or not)."""
    sessions = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    lines = decode_lines(path, raw)
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = whole_file_hint(path, lines) if number - 1 == first else None
            raise DataError(hint or f"{where}: not JSON ({e.msg} at column {e.colno}); each "
                            "line must be one JSON object") from e
        if not isinstance(record, dict):
            hint = whole_file_hint(path, lines) if number - 1 == first else None
            raise DataError(hint or f"{where}: expected a JSON object with a 'messages' field")
        if "messages" not in record:
            raise missing_messages(record, where)
        messages = check_messages(record.pop("messages"), where)
        sessions.append(Session(messages, str(path), number, record))
    return sessions


def data_files(folder: Path) -> list[Path]:
    """The data files under `folder`: `*.jsonl` and `*.jsonl.gz` at any depth, sorted by path.

    Hidden files and folders are skipped: editors and tools leave copies there (Jupyter's
    `.ipynb_checkpoints/`, read twice otherwise) and macOS leaves binary `._name` files.
    """
    found = {p for pattern in DATA_PATTERNS for p in folder.rglob(pattern)}
    return sorted(p for p in found if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_sessions(path: str | Path) -> list[Session]:
    """Every session in a JSONL file or a folder of them, in order.

    Raises DataError when the path is missing, holds no data file, or has no session.
    """
    path = Path(path)
    if path.is_dir():
        files = data_files(path)
        if not files:
            raise DataError(f"{path}: folder has no *.jsonl files (nor *.jsonl.gz)")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    sessions = [s for file in files for s in read_jsonl(file)]
    if not sessions:
        raise DataError(f"{path}: no sessions (every line is blank)")
    return sessions
