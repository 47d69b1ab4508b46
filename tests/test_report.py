"""report.html: per family, the runs side by side, each rate a bar with its Wilson interval,
the difference of two runs; transcripts side by side; every name and text escaped.

The page is parsed into a tree (tags must close in order) and read back, so the tests
check the structure a browser shows, not substrings."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from sekft.eval import HTML_RATES, Episode, report, report_html, wilson

VOID = {"meta", "br"}


class Tree(HTMLParser):
    """Nodes {"tag", "attrs", "children", "text"}; "text" is all the text inside."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.root = {"tag": "root", "attrs": {}, "children": [], "text": ""}
        self.stack = [self.root]
        self.feed(page)
        self.close()
        assert self.stack == [self.root], "unclosed tags"

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "children": [], "text": ""}
        self.stack[-1]["children"].append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        assert self.stack[-1]["tag"] == tag, f"</{tag}> closes <{self.stack[-1]['tag']}>"
        self.stack.pop()

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data


def find(node: dict, tag: str, cls: str | None = None) -> list[dict]:
    """Every descendant `tag` (with `cls` among its classes), in document order."""
    found = []
    for child in node["children"]:
        if child["tag"] == tag and (cls is None or cls in child["attrs"].get("class", "").split()):
            found.append(child)
        found += find(child, tag, cls)
    return found


def style(node: dict, prop: str) -> float:
    """A percentage from the node's inline style."""
    return float(re.search(rf"(?:^|;){prop}:([\d.]+)%", node["attrs"]["style"]).group(1))


def episodes(run: str, family: str, passed: int, n: int, ending: str = "exit") -> list[Episode]:
    return [Episode(f"{family}-{i}", family, "heldout", "exit", run, ending=ending,
                    passed=i < passed, turns=2, tokens=3, command_mode=[True, i < passed],
                    messages=[{"role": "user", "content": f"prompt {i} $ "},
                              {"role": "assistant", "content": f"reply {i} of {run}"}])
            for i in range(n)]


def page_of(eps: list[Episode]) -> dict:
    """report.html as write_outputs makes it (runs in the order sekft-eval runs them)."""
    names = dict.fromkeys(e.run for e in eps)
    runs = {run: report([e for e in eps if e.run == run]) for run in names}
    return Tree(report_html(runs, eps)).root


def label(th: dict) -> str:
    """A heading cell's own text, without the <small> detail under or after it."""
    small = find(th, "small")
    return th["text"].removesuffix(small[0]["text"] if small else "").strip()


def rates_table(page: dict, heading: str) -> dict:
    """The table under <h2>`heading`</h2>."""
    body = find(page, "body")[0]
    h2 = next(h for h in body["children"] if h["tag"] == "h2" and h["text"] == heading)
    return body["children"][body["children"].index(h2) + 1]


def rate_cells(page: dict, heading: str) -> dict[str, dict[str, dict]]:
    """{family: {"run": the run labels' cell, rate title: cell}} of a rates table."""
    header, *rows = find(rates_table(page, heading), "tr")
    titles = [label(th) for th in find(header, "th")]
    blocks, family = {}, None
    for row in rows:
        if row["attrs"].get("class") == "family":
            family = label(find(row, "th")[0])
        else:
            blocks[family] = dict(zip(titles, find(row, "td"), strict=True))
    return blocks


def lines(cell: dict) -> list[dict]:
    return find(cell, "div", "line")


@pytest.fixture(scope="module")
def compared():
    # adapter 9/10 against base 1/10 in "ledger"; 2/5 against 2/5 in "rename".
    eps = (episodes("adapter", "ledger", 9, 10) + episodes("adapter", "rename", 2, 5)
           + episodes("base", "ledger", 1, 10) + episodes("base", "rename", 2, 5, "budget"))
    return page_of(eps)


def test_every_family_gets_a_block_after_all_families_with_every_rate(compared):
    for heading, rates in HTML_RATES.items():
        blocks = rate_cells(compared, heading)
        assert list(blocks) == ["all families", "ledger", "rename"]
        for cells in blocks.values():
            assert list(cells) == ["run", *(title for _, title, _, _ in rates)]
    families = find(rates_table(compared, "Rates by family"), "tr", "family")
    assert find(families[1], "small")[0]["text"] == (
        "10 episodes per run · mean turns: base 2.0, adapter 2.0 · tokens generated: base 30, "
        "adapter 30")


def test_each_rate_shows_the_base_then_the_adapter_then_their_difference(compared):
    ledger = rate_cells(compared, "Rates by family")["ledger"]
    assert [line["text"] for line in lines(ledger["run"])] == ["base", "adapter", "adapter − base"]
    cell = ledger["checker pass"]
    base, adapter, difference = lines(cell)
    assert "10%" in base["text"] and "1/10" in base["text"]
    assert "90%" in adapter["text"] and "9/10" in adapter["text"]
    assert difference["text"] == "+80 pts"


def test_each_bar_is_as_long_as_its_rate_with_its_wilson_interval_over_it(compared):
    cell = rate_cells(compared, "Rates by family")["ledger"]["checker pass"]
    for line, k in zip(lines(cell)[:2], (1, 9), strict=True):
        low, high = wilson(k, 10)
        assert style(find(line, "span", "fill")[0], "width") == pytest.approx(10 * k, abs=0.05)
        whisker = find(line, "span", "ci")[0]
        assert style(whisker, "left") == pytest.approx(100 * low, abs=0.05)
        assert style(whisker, "width") == pytest.approx(100 * (high - low), abs=0.1)
        assert f"[{100 * low:.0f}–{100 * high:.0f}]" in line["text"]


def test_a_difference_is_coloured_only_when_the_intervals_are_apart(compared):
    rates = rate_cells(compared, "Rates by family")
    ledger, rename = rates["ledger"], rates["rename"]
    assert "better" in lines(ledger["checker pass"])[2]["attrs"]["class"].split()
    assert lines(rename["checker pass"])[2]["attrs"]["class"].split() == ["line", "diff"]
    budget = lines(rate_cells(compared, "Endings by family")["rename"]["turn budget used up"])[2]
    assert budget["text"] == "-100 pts" and "better" in budget["attrs"]["class"]


def test_one_run_has_bars_and_no_difference():
    page = page_of(episodes("model", "ledger", 3, 4))
    blocks = rate_cells(page, "Rates by family")
    assert [line["text"] for line in lines(blocks["ledger"]["run"])] == ["model"]
    assert all(len(lines(cell)) == 1 for cells in blocks.values() for cell in cells.values())
    assert find(page, "div", "diff") == []


def test_transcripts_put_each_scenarios_runs_side_by_side(compared):
    tables = find(compared, "table", "transcripts")
    assert [t["text"] for t in find(compared, "h3")] == ["ledger", "rename"]
    header, first, *_ = find(tables[0], "tr")
    assert [th["text"] for th in find(header, "th")] == ["scenario", "base", "adapter"]
    scenario, base, adapter = find(first, "td")
    assert scenario["text"] == "ledger-0"
    assert "reply 0 of base" in base["text"] and "reply 0 of adapter" in adapter["text"]
    assert "PASS" in base["text"] and "PASS" in adapter["text"]


def test_every_name_and_text_is_escaped():
    evil = "<img src=x onerror=alert(1)>'\""
    eps = episodes(evil, evil, 1, 2) + [Episode(evil, evil, "heldout", "exit", evil, error=evil)]
    for e in eps:
        e.messages[:] = [{"role": "assistant", "content": evil}]
        e.check_output = e.panic_reason = evil
    page = page_of(eps)
    assert find(page, "img") == [] and find(page, "script") == []
    assert find(page, "title")[0]["text"] == f"sekft eval: {evil}"
    assert list(rate_cells(page, "Rates by family")) == ["all families", evil]
    assert [h["text"] for h in find(page, "h3")] == [evil]
    rows = find(find(page, "table", "transcripts")[0], "tr")[1:]
    assert [find(row, "td")[0]["text"] for row in rows] == [f"{evil}-0", f"{evil}-1", evil]
    assert {pre["text"] for pre in find(page, "pre")} == {evil}
    assert find(page, "li")[0]["text"] == f"{evil}: {evil}: {evil}"
