"""read_sessions: JSONL files and folders of them, errors naming file, line and field."""

from __future__ import annotations

import json

import pytest
from template_oracles import SHELL_SESSIONS

from sekft.data import read_sessions
from sekft.errors import DataError

SESSION = {"messages": [{"role": "user", "content": "$ "}, {"role": "assistant", "content": "ls"}]}


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reads_each_line_as_a_session_keeping_other_fields(tmp_path):
    record = {**SESSION, "id": "s1", "scenario": "quiet"}
    path = write_lines(tmp_path / "a.jsonl", json.dumps(record), "", json.dumps(SESSION))
    sessions = read_sessions(path)
    assert [s.messages for s in sessions] == [SESSION["messages"]] * 2
    assert sessions[0].extra == {"id": "s1", "scenario": "quiet"}
    assert [(s.source_file, s.source_line) for s in sessions] == [(str(path), 1), (str(path), 3)]


def test_reads_a_folder_of_jsonl_files_in_path_order(tmp_path):
    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "sub" / "b.jsonl", json.dumps({**SESSION, "id": "b"}))
    write_lines(tmp_path / "a.jsonl", json.dumps({**SESSION, "id": "a"}))
    (tmp_path / "notes.txt").write_text("not data")
    assert [s.extra["id"] for s in read_sessions(tmp_path)] == ["a", "b"]


def test_reads_the_shell_fixture():
    sessions = read_sessions(SHELL_SESSIONS)
    assert [s.extra["id"] for s in sessions] == ["shell-0001", "shell-0002"]
    assert sessions[0].messages[-1] == {"role": "assistant", "content": "exit"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad.jsonl:2: not JSON"),
        ("[1, 2]", r"bad.jsonl:2: expected a JSON object"),
        ('{"id": 1}', r"bad.jsonl:2: field 'messages': missing"),
        ('{"messages": []}', r"bad.jsonl:2: field 'messages': expected a non-empty list"),
        ('{"messages": ["hi"]}', r"bad.jsonl:2: field 'messages\[0\]': expected an object"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}',
            r"bad.jsonl:2: field 'messages\[0\].role': expected one of",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": null}]}',
            r"bad.jsonl:2: field 'messages\[1\].content': expected a string, got null",
        ),        (
            '{"messages": [{"role": "user", "content": "x", "weight": 0}]}',
            r"bad.jsonl:2: field 'messages\[0\].weight': expected 0 or 1 on an assistant turn, "
            r"got 0 on a user turn",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]}',
            r"bad.jsonl:2: field 'messages\[0\].weight': expected 0 or 1 .* got 0.5",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "x", "weight": true}]}',
            r"bad.jsonl:2: field 'messages\[0\].weight': expected 0 or 1 .* got true",
        ),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", json.dumps(SESSION), line)
    with pytest.raises(DataError, match=message):
        read_sessions(path)


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_sessions(tmp_path / "nope.jsonl")


def test_folder_without_jsonl_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        read_sessions(tmp_path)


def test_file_of_blank_lines_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no sessions"):
        read_sessions(write_lines(tmp_path / "empty.jsonl", "", "  "))
