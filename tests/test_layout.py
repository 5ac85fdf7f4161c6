"""The layout every numbered script keeps, so that a reader meets the stage's own code first.

Each script is: the docstring, the imports, the stage's own code and main(), then (if it copies
anything) one appendix of marked copies. Budgets, counted as `wc -l` counts: 01-04 at most 700
lines, the later stages at most 1,000, of which the part above the appendix's section rule (the
docstring included) at most 600. A budget is a ceiling, not a target: lines are split until each
says one thing, then machinery is cut, never explanation. A copy comes from an earlier stage, never a later one: a reader
who reaches it has read its origin already.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("[0-9][0-9]_*.py"))
APPENDIX = "# Appendix: pieces copied unchanged from earlier stages"
MARKER = re.compile(r"^# copied from (\d\d)_\w+\.py: \w+")


def budget(path: Path) -> int:
    return 700 if int(path.name[:2]) <= 4 else 1000


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_the_script_keeps_its_line_budget(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= budget(path), f"{path.name}: {len(lines)} lines, budget {budget(path)}"
    starts = [i for i, line in enumerate(lines) if line.startswith(APPENDIX)]
    assert len(starts) <= 1, f"{path.name}: {len(starts)} appendices; keep one"
    assert not starts or lines[starts[0] - 1].startswith("# ---"), f"{path.name}: no rule above the appendix"
    if starts and int(path.name[:2]) >= 5:  # 01-04 have the 700-line budget only
        above = starts[0] - 1  # the lines above the section rule that opens the appendix
        assert above <= 600, f"{path.name}: {above} lines before the appendix, budget 600"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_copies_sit_in_the_appendix_and_come_from_earlier_stages(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(APPENDIX)), len(lines))
    for i, line in enumerate(lines):
        if m := MARKER.match(line):
            assert i > start, f"{path.name}:{i + 1} a copy above the appendix"
            assert int(m[1]) < int(path.name[:2]), f"{path.name}:{i + 1} copies from a later stage"
