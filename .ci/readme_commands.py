"""Print the commands of the README's quickstart block, one a line, in order (comments dropped).

``.ci/quickstart`` runs them in a fresh clone; ``tests/test_quickstart.py`` checks what they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

SECTION = "## Quickstart"


def quickstart_commands(readme: str) -> list[str]:
    """The non-comment lines of the first ```bash block of the README's Quickstart section."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:] if end < 0 else readme[start:end]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print("\n".join(quickstart_commands(path.read_text(encoding="utf-8"))))
