"""Copied code must stay identical to its origin.

Each numbered script is self-contained, so it copies the pieces it needs from earlier scripts.
A copy is marked by the line right above it:

    # copied from 04_gpt.py: GPT
    # copied from 03_attention.py: CausalSelfAttention with attn->self_attn

This test finds every marker, takes the named top-level unit (class, function or module-level
constant) from the origin file, applies the renames, and compares the two texts: a copy is its
origin byte for byte, docstrings and comments included, so an explanation never goes stale in one
file while it is fixed in another. When an origin changes, rewrite its copies:

    python tests/test_copies.py --fix

(a small version of Hugging Face's `# Copied from` check and `make fix-copies`).
"""

import ast
import difflib
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(
    r"^# copied from (?P<origin>\S+\.py): (?P<name>\w+)(?: with (?P<renames>.+))?\s*$")


@dataclass
class Copy:
    file: Path  # the file that holds the copy
    line: int  # 1-based line number of the marker
    origin: str  # e.g. "04_gpt.py"
    name: str  # the unit's name in the origin
    renames: list[tuple[str, str]]

    def __str__(self):
        return f"{self.file.name}:{self.line} {self.name} (from {self.origin})"


def scripts() -> list[Path]:
    return sorted(ROOT.glob("[0-9][0-9]_*.py"))


def find_copies() -> list[Copy]:
    copies = []
    for path in scripts():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if m := MARKER.match(line):
                renames = []
                for pair in (m["renames"] or "").split(","):
                    if pair.strip():
                        old, _, new = pair.strip().partition("->")
                        renames.append((old.strip(), new.strip()))
                copies.append(Copy(path, i, m["origin"], m["name"], renames))
    return copies


def unit_name(node: ast.stmt) -> str | None:
    """The name a top-level statement defines: `class X`, `def f`, `X = ...`, `X: int = ...`."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        if isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def first_line(node: ast.stmt) -> int:
    """The first line of a unit, counting its decorators."""
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def unit_at(path: Path, line: int) -> ast.stmt | None:
    """The top-level unit that starts on `line` (decorators included)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if first_line(node) == line:
            return node
    return None


def unit_named(path: Path, name: str) -> ast.stmt | None:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if unit_name(node) == name:
            return node
    return None


def source_of(path: Path, node: ast.stmt) -> str:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(lines[first_line(node) - 1 : node.end_lineno])


def rename(source: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        source = re.sub(rf"\b{re.escape(old)}\b", new, source)
    return source


def check(copy: Copy) -> tuple[str | None, str | None]:
    """Return (problem, expected_source): problem is None when the copy matches its origin."""
    origin_path = ROOT / copy.origin
    if not origin_path.exists():
        return f"{copy}: origin file {copy.origin} does not exist", None
    origin_node = unit_named(origin_path, copy.name)
    if origin_node is None:
        return f"{copy}: {copy.origin} defines no top-level {copy.name}", None
    above = origin_path.read_text(encoding="utf-8").splitlines()[first_line(origin_node) - 2]
    if MARKER.match(above):
        problem = f"{copy}: {copy.origin} holds a copy of {copy.name} itself; name the first file"
        return problem, None
    expected = rename(source_of(origin_path, origin_node), copy.renames)
    node = unit_at(copy.file, copy.line + 1)
    if node is None:
        problem = f"{copy}: the marker must stand right above the copied class, function, constant"
        return problem, expected
    if unit_name(node) != rename(copy.name, copy.renames):
        return f"{copy}: the unit below the marker is {unit_name(node)}, not {copy.name}", expected
    got = source_of(copy.file, node)
    if got == expected:
        return None, expected
    diff = "\n".join(
        difflib.unified_diff(
            expected.splitlines(),
            got.splitlines(),
            f"{copy.origin}: {copy.name}",
            f"{copy.file.name}: {unit_name(node)}",
            lineterm="",
        )
    )
    problem = f"{copy} differs from its origin (fix: python tests/test_copies.py --fix)\n{diff}"
    return problem, expected


def fix(paths: list[Path]) -> int:
    """Rewrite every copy in `paths` that is not its origin to the letter; return how many.

    Docstrings and comments are refreshed too, so a copy never keeps an outdated explanation.
    """
    fixed = 0
    for path in paths:
        # bottom-up, so that rewriting one copy does not shift the line numbers of the next
        for copy in sorted((c for c in find_copies() if c.file == path), key=lambda c: -c.line):
            problem, expected = check(copy)
            node = unit_at(copy.file, copy.line + 1)
            if expected is None or node is None:
                print("cannot fix:", problem.splitlines()[0])
                continue
            if source_of(path, node) == expected:
                continue  # identical to the letter, docstrings and comments included
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            lines[first_line(node) - 1 : node.end_lineno] = [expected]
            path.write_text("".join(lines), encoding="utf-8")
            print("fixed:", copy)
            fixed += 1
    return fixed


@pytest.mark.parametrize("copy", find_copies(), ids=str)
def test_copy_matches_origin(copy):
    problem, _ = check(copy)
    assert problem is None, problem


# Words that point at a place in a file: true in the origin, false wherever the unit is copied to.
POINTERS = re.compile(r"\b(below|see above|defined above|in this file)\b", re.I)


def prose(source: str) -> str:
    """A unit's docstrings and comments: the text that talks about the code, and so may point at a
    place in a file. String literals are data: Alpaca's prompt begins "Below is an instruction"."""
    docs = [ast.get_docstring(n, clean=False) or "" for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT]
    return "\n".join(docs + comments)


@pytest.mark.parametrize("copy", find_copies(), ids=str)
def test_copied_text_is_true_where_it_lands(copy):
    """A copied unit's text must hold in every file that holds it: no "see below", no "in this
    file"."""
    node = unit_at(copy.file, copy.line + 1)
    assert node is not None, f"{copy}: no unit below the marker"
    found = POINTERS.findall(prose(source_of(copy.file, node)))
    assert not found, (
        f"{copy}: its text says {found}, false where it is copied; reword it in {copy.origin}")


def test_markers_are_well_formed():
    """A line that looks like a marker but does not parse would silently escape the check."""
    for path in scripts():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.lower().startswith("# copied from"):
                assert MARKER.match(line), f"{path.name}:{i}: malformed copy marker: {line!r}"


def test_the_pointer_check_reads_docstrings_and_comments_only():
    assert POINTERS.findall(prose('def f():\n    """See below."""\n    return "Below is data"\n'))
    assert POINTERS.findall(prose('def f():\n    return 1  # defined below\n'))
    data = 'def f():\n    """Doc."""\n    return "Below is an instruction"\n'
    assert not POINTERS.findall(prose(data))


def test_the_check_catches_a_drifted_copy(tmp_path, monkeypatch):
    """The checker itself can fail: a copy with one changed constant is reported, and --fix mends
    it."""
    (tmp_path / "01_a.py").write_text("def f(x):\n    '''Doc.'''\n    return x + 1\n")
    (tmp_path / "02_b.py").write_text("# copied from 01_a.py: f\ndef f(x):\n    return x + 2\n")
    stale = "# copied from 01_a.py: f\ndef f(x):\n    '''Old doc.'''\n    return x + 1\n"
    (tmp_path / "03_c.py").write_text(stale)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    code, doc = find_copies()
    problem, _ = check(code)
    assert problem and "differs" in problem and "+ 2" in problem
    problem, _ = check(doc)  # the same code with a stale docstring is a drift too
    assert problem and "Old doc" in problem
    assert fix([tmp_path / "02_b.py", tmp_path / "03_c.py"]) == 2
    assert all(check(c)[0] is None for c in find_copies())


if __name__ == "__main__":
    if "--fix" in sys.argv:
        targets = [ROOT / a for a in sys.argv[1:] if a != "--fix"] or scripts()
        print(f"{fix(targets)} copies rewritten")
    else:
        problems = [p for p, _ in map(check, find_copies()) if p]
        print("\n\n".join(problems) or f"all {len(find_copies())} copies match their origins")
        sys.exit(1 if problems else 0)
