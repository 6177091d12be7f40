"""The README's code blocks, extracted to be run as written (tests/test_readme.py, .ci/wheel-check).

Standard library only: .ci/wheel-check runs this file with a fresh virtual environment's Python,
where ``fastdiff`` must come from the installed wheel, not from the checkout.

    python tests/readme_blocks.py list          # index, language and first line of every block
    python tests/readme_blocks.py run INDEX     # run one python block in this interpreter
"""
from __future__ import annotations

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path=README):
    """``[(language, code), ...]`` of the fenced blocks, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(pathlib.Path(path).read_text())]


def commands(code: str):
    """The shell commands of a bash block: one per line, comments and blank lines dropped (a
    trailing ``# ...`` comment is the README's explanation, not part of the command)."""
    out = []
    for line in code.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def main(argv):
    if argv[:1] == ["list"]:
        for i, (lang, code) in enumerate(blocks()):
            print(i, lang, code.splitlines()[0] if code else "")
        return 0
    if argv[:1] == ["run"] and len(argv) == 2:
        lang, code = blocks()[int(argv[1])]
        if lang != "python":
            print(f"block {argv[1]} is {lang!r}, not python", file=sys.stderr)
            return 2
        exec(compile(code, f"README.md block {argv[1]}", "exec"), {"__name__": "__main__"})
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
