"""Check the relative links in README.md and docs/*.md: each target file must exist, and a
``#fragment`` must name a heading of the target (GitHub's slug rule).

    python docs/check_links.py [--allow-missing docs/plugins.md,docs/architecture.md]

Prints one line per broken link and exits 1 if any (links listed in --allow-missing are reported
but do not fail).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path):
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
                yield number, match.group(1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allow-missing", default="", help="comma-separated repo-relative paths")
    args = parser.parse_args()
    allowed = {p for p in args.allow_missing.split(",") if p}
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = 0
    for source in files:
        for number, target in links(source):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, ...
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (source.parent / file_part).resolve() if file_part else source
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            where = f"{source.relative_to(ROOT)}:{number}: {target}"
            if not resolved.exists():
                if rel in allowed:
                    print(f"{where}: missing (allowed)")
                else:
                    print(f"{where}: no such file {rel}")
                    broken += 1
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                print(f"{where}: no heading #{fragment} in {rel}")
                broken += 1
    print(f"{len(files)} files checked, {broken} broken link(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
