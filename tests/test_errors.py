from sekft.errors import DataError, run_cli


def test_cli_prints_one_line_and_exits_nonzero_on_sekft_error(capsys):
    def main(argv):
        raise DataError("data.jsonl:3: field 'messages': missing")

    assert run_cli("sekft-x", main, []) == 1
    err = capsys.readouterr().err
    assert err == "sekft-x: error: data.jsonl:3: field 'messages': missing\n"


def test_cli_returns_main_exit_code_when_nothing_fails():
    assert run_cli("sekft-x", lambda argv: 0, []) == 0
