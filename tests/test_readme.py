"""The README is for newcomers: short, the two set-up commands first, links that resolve, and a
quick start that works when pasted. The quick-start test runs the README's bash block as written
(`bash -e`) next to a small reviews.csv, with the bundled MiniLM (installed by `make test`)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = "<!-- quick-start -->"

# Pages the README must link: what moved out of it lives there.
DOC_PAGES = [
    "docs/speed.md",
    "docs/reliability.md",
    "docs/distributed.md",
    "docs/config.md",
    "docs/cli.md",
    "docs/tasks/classification.md",
    "docs/tasks/token-classification.md",
    "docs/tasks/question-answering.md",
    "docs/tasks/seq2seq.md",
]


def _readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- shape of the README


def test_readme_is_short():
    assert len(_readme_lines()) < 300


def test_readme_starts_with_what_it_does_then_make_demo_and_make_test():
    head = _readme_lines()[:15]
    demo = [i for i, line in enumerate(head) if line.startswith("make demo")]
    test = [i for i, line in enumerate(head) if line.startswith("make test")]
    assert demo and test, "the first 15 lines must hold the commands `make demo` and `make test`"
    prose = [line for line in head[: demo[0]] if line.strip() and not line.startswith(("#", "```"))]
    assert prose, "a sentence saying what tunesmith does comes before the commands"


def test_first_screen_has_no_benchmark_figures():
    first_screen = "\n".join(_readme_lines()[:25])
    for figure in ("samples/s", "±", "GFLOP"):
        assert figure not in first_screen, f"benchmark figures belong in docs/speed.md, not the first screen ({figure!r})"


def test_readme_links_every_docs_page():
    targets = {target for _, target in _links(README)}
    for page in DOC_PAGES:
        assert (ROOT / page).is_file(), f"{page} is missing"
        assert any(t.split("#")[0] == page for t in targets), f"README does not link {page}"


# --------------------------------------------------------------------------- links


def _strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)  # inline code


def _links(path: Path) -> list[tuple[int, str]]:
    text = _strip_code(path.read_text(encoding="utf-8"))
    found = []
    for match in re.finditer(r"\[[^\]\n]*\]\(([^)\s]+)\)", text):
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, match.group(1)))
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug, n = _slug(heading), 1
        while slug in anchors:  # repeated headings get -1, -2, ...
            slug, n = f"{_slug(heading)}-{n}", n + 1
        anchors.add(slug)
    return anchors


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for line, target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"line {line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"line {line}: {target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- the quick start, as written


def _quick_start() -> str:
    lines = _readme_lines()
    marks = [i for i, line in enumerate(lines) if MARKER in line]
    assert len(marks) == 1, f"expected one {MARKER} line in README.md, found {len(marks)}"
    rest = lines[marks[0] + 1 :]
    while rest and not rest[0].strip():
        rest = rest[1:]
    assert rest and rest[0].strip() == "```bash", f"a ```bash block must follow {MARKER}"
    end = rest.index("```", 1)
    return "\n".join(rest[1:end]) + "\n"


POSITIVE = ["a gorgeous, witty film", "warm and very funny", "a delight from start to finish", "beautifully acted",
            "smart, moving and fresh", "the best film this year", "charming and clever", "a joy to watch",
            "tender and wise", "sharp writing and a great cast"]
NEGATIVE = ["a dull, lifeless mess", "boring and far too long", "the jokes fall flat", "badly acted",
            "a tedious waste of time", "the worst film this year", "clumsy and loud", "a chore to sit through",
            "flat and predictable", "a weak script and a wooden cast"]


def _write_reviews(path: Path) -> None:
    rows = []
    for i in range(20):  # 40 rows, two labels
        suffix = "" if i < 10 else ", really"
        rows += [(POSITIVE[i % 10] + suffix, "positive"), (NEGATIVE[i % 10] + suffix, "negative")]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def test_quick_start_runs_as_written(tmp_path):
    from tunesmith.assets import installed_assets

    missing = [name for name, where in installed_assets().items() if where.startswith("not installed")]
    if missing:
        pytest.skip(f"bundled assets not installed (make test installs them): {missing}")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"not running in a virtualenv with bin/activate ({sys.prefix})")

    script = _quick_start()
    assert "reviews.csv" in script and "text,label" in script, "the quick start names reviews.csv and its columns"
    _write_reviews(tmp_path / "reviews.csv")
    (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    (tmp_path / "quick-start.sh").write_text(script, encoding="utf-8")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        env["OMP_NUM_THREADS"] = "1"  # one core per xdist worker, as conftest does for in-process torch
    proc = subprocess.run(["bash", "-e", "quick-start.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    output = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"the README quick start failed (exit code {proc.returncode}):\n{output}"

    run_dirs = re.findall(r"output\.dir=(\S+)", script)
    assert run_dirs, "the quick start's train line sets output.dir"
    run_dir = tmp_path / run_dirs[0]
    assert (run_dir / "model").is_dir() and (run_dir / "metrics.json").is_file(), output
    assert "validation" in json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))

    predictions = []
    for line in proc.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "label" in record:
            predictions.append(record)
    assert predictions, f"predict printed no JSON line with a label:\n{output}"
    assert predictions[0]["label"] in {"positive", "negative"}
