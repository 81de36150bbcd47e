"""The documentation agrees with the code, and the shipped files speak of the software alone."""

import os
import re

import pytest

from ccreid_jax.run import RESULT_NEUTRAL_FIELDS

from conftest import ROOT

# Absolute paths of a development machine, the names of its tools and references to files
# outside the repository: none belongs in what ships. A path counts only where it starts (after
# a space, a quote, `=`, `(` ...), so that `data/root/x` or `runs/work/` do not match.
FORBIDDEN = {
  "development machine path": re.compile(r"(?<![\w.~/-])/(?:work|root)/"),
  "pytest temporary folder": re.compile(r"/tmp/pytest"),
  "workplace tool": re.compile(r"farm-(?:bench|studio)", re.IGNORECASE),
  "workplace wording": re.compile(r"\bthis " + "ses" + r"sion\b", re.IGNORECASE),
  "file outside the repository": re.compile(r"\.\./shared/|\bALGORITHMS" + r"\.md\b"),
}
SHIPPED = ("README.md", "docs", "scripts", "configs")
# The words the checks look for are assembled here, so that this file does not hold them.
_SESSION = "ses" + "sion"
_SPEC = "ALGORITHMS" + ".md"


def _neutral_fields_in_reliability_doc():
  """The fields listed after ``(`run.RESULT_NEUTRAL_FIELDS`):`` up to the sentence's end,
  ``x.*`` read as the prefix ``x.``."""
  with open(os.path.join(ROOT, "docs", "reliability.md"), encoding="utf-8") as f:
    text = f.read()
  marker = "(`run.RESULT_NEUTRAL_FIELDS`):"
  assert text.count(marker) == 1, f"docs/reliability.md should hold {marker!r} once"
  listed = re.split(r"\.\s", text.split(marker, 1)[1], maxsplit=1)[0]
  assert re.fullmatch(r"\s*`[^`]+`(\s*,\s*`[^`]+`)*\s*", listed), f"not a list: {listed!r}"
  fields = re.findall(r"`([^`]+)`", listed)
  return tuple(f[:-1] if f.endswith(".*") else f for f in fields)


def test_reliability_doc_lists_exactly_the_result_neutral_fields():
  assert _neutral_fields_in_reliability_doc() == RESULT_NEUTRAL_FIELDS


def _shipped_text_files():
  for name in SHIPPED:
    path = os.path.join(ROOT, name)
    if os.path.isfile(path):
      yield path
      continue
    for folder, dirs, files in os.walk(path):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      for file in files:
        yield os.path.join(folder, file)


def _forbidden_in(text):
  """``(line number, what, line)`` for every line of ``text`` that matches a pattern."""
  return [
    (number, what, line.strip())
    for number, line in enumerate(text.splitlines(), 1)
    for what, pattern in FORBIDDEN.items()
    if pattern.search(line)
  ]


@pytest.mark.parametrize(
  "line, expected",
  [
    ('    "out": "/root/out/train_bf16.json"', "development machine path"),
    ("cd /work/main && python -m pytest", "development machine path"),
    ("--root=/tmp/pytest-of-root/pytest-0/data", "pytest temporary folder"),
    ("measured with Farm-Bench", "workplace tool"),
    ("farm-studio's GPU", "workplace tool"),
    (f"the figures of this {_SESSION}", "workplace wording"),
    ("see ../shared/notes.md", "file outside the repository"),
    (f"as {_SPEC} says", "file outside the repository"),
  ],
)
def test_forbidden_patterns_catch_what_they_are_for(line, expected):
  assert [what for _, what, _ in _forbidden_in(line)] == [expected]


@pytest.mark.parametrize(
  "line",
  [
    "--root runs/recipe/data --workdir runs/recipe/run20",
    "config.data.root/Market-1501-v15.09.15 and data/root/x",
    "--root /tmp/ccreid_recipe/data",
    "docs/algorithms.md section 5; ../../../secret/x.jpg",
    f"a {_SESSION} of training",
    "the farm benchmark",
  ],
)
def test_forbidden_patterns_leave_ordinary_text_alone(line):
  assert _forbidden_in(line) == []


def test_shipped_files_speak_of_the_software_alone():
  found = []
  for path in _shipped_text_files():
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError:  # images
      continue
    found += [
      f"{os.path.relpath(path, ROOT)}:{number}: {what}: {line}"
      for number, what, line in _forbidden_in(text)
    ]
  assert not found, "\n".join(found)
