"""The layout every numbered script keeps, so that a reader meets the stage's own code first.

Each script is: the docstring, the imports, the stage's own code and main(), then (if it copies
anything) one appendix of marked copies. Budgets, counted as `wc -l` counts: 01-04 at most 700
lines; the later stages at most 600 above the appendix's section rule (the docstring included) and
1,000 in all. The files still over them are held at their size today, so that none grows back:
STAGE_OVER_BUDGET (the two training loops that save, resume to the weights of an uninterrupted run
and stop on Ctrl-C after a save: 05, and 06, whose ranks also agree where they start and when to
stop; and 11, whose judge skips a failed request instead of losing the answers judged before it)
and TOTAL_OVER_BUDGET (05 and 06: beside their copies, 422 and 436 lines that follow from their
origins, a 1,000-line total leaves 578 and 564 lines for their stage parts).
A budget is a ceiling, not a target: lines are split until each says one thing, then machinery is
cut, never explanation. A copy comes from an earlier stage, never a later one: a reader who
reaches it has read its origin already.

Density, one idea per line: the stage part's code lines (comments, docstrings and blank lines left
out, a trailing comment cut) average at most 52 characters, and at most 4% of them reach 100.
For scale, nanoGPT's model.py averages 52.0 with 7% at 100+, its train.py 44.4 with 3%.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("[0-9][0-9]_*.py"))
APPENDIX = "# Appendix: pieces copied unchanged from earlier stages"
MARKER = re.compile(r"^# copied from (\d\d)_\w+\.py: \w+")
MAX_MEAN = 52  # characters per code line
MAX_LONG = 0.04  # the share of code lines of 100 characters or more


# over the budgets: each ceiling is the file's size today, so that none grows back
STAGE_OVER_BUDGET = {"05": 621, "06": 634, "11": 611}
TOTAL_OVER_BUDGET = {"05": 1043, "06": 1070}


def budget(path: Path) -> int:
    number = path.name[:2]
    if int(number) <= 4:
        return 700
    return TOTAL_OVER_BUDGET.get(number, 1000)


def stage_budget(path: Path) -> int:
    return STAGE_OVER_BUDGET.get(path.name[:2], 600)


def stage_part(lines: list[str]) -> list[str]:
    """The lines above the section rule that opens the appendix (all of them without one)."""
    starts = [i for i, line in enumerate(lines) if line.startswith(APPENDIX)]
    if not starts:
        return lines
    return lines[: starts[0] - 1]


def code_lines(source: str) -> list[str]:
    """The lines that hold code: no blank lines, comments or docstrings; a trailing comment cut."""
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if not isinstance(body, list) or not body:
            continue
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            if isinstance(first.value.value, str):
                docstring_lines.update(range(first.lineno, first.end_lineno + 1))
    code = []
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or number in docstring_lines:
            continue
        code.append(line.split("  #")[0].rstrip())
    return code


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_the_script_keeps_its_line_budget(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= budget(path), f"{path.name}: {len(lines)} lines, budget {budget(path)}"
    starts = [i for i, line in enumerate(lines) if line.startswith(APPENDIX)]
    assert len(starts) <= 1, f"{path.name}: {len(starts)} appendices; keep one"
    if starts:
        assert lines[starts[0] - 1].startswith("# ---"), f"{path.name}: no rule above the appendix"
    if starts and int(path.name[:2]) >= 5:  # 01-04 have the 700-line budget only
        above = starts[0] - 1  # the lines above the section rule that opens the appendix
        cap = stage_budget(path)
        assert above <= cap, f"{path.name}: {above} lines before the appendix, budget {cap}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_the_stage_reads_one_idea_per_line(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    code = code_lines("\n".join(stage_part(lines)) + "\n")
    mean = sum(map(len, code)) / len(code)
    long_share = sum(len(line) >= 100 for line in code) / len(code)
    assert mean <= MAX_MEAN, f"{path.name}: {mean:.1f} characters per code line, at most {MAX_MEAN}"
    assert long_share <= MAX_LONG, f"{path.name}: {long_share:.0%} of code lines at 100+ characters"


def test_the_density_count_leaves_out_prose():
    source = 'def f(x):\n    """Doc\n    string."""\n    # a comment\n\n    return x  # why\n'
    assert code_lines(source) == ["def f(x):", "    return x"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_copies_sit_in_the_appendix_and_come_from_earlier_stages(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(APPENDIX)), len(lines))
    for i, line in enumerate(lines):
        if m := MARKER.match(line):
            assert i > start, f"{path.name}:{i + 1} a copy above the appendix"
            assert int(m[1]) < int(path.name[:2]), f"{path.name}:{i + 1} copies from a later stage"
