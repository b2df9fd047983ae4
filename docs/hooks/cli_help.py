"""MkDocs hook: the pages' `<!-- adsc-llava-help COMMAND -->` markers become that command's `--help`, at build time.

The help text comes from the installed `adsc-llava` itself, so the documented options cannot drift from the parser.
On GitHub the marker is an invisible comment; the page says which command prints the same text.
`tests/test_docs.py` reads the same help through `cli_help()`.
"""

import json
import os
import re
import subprocess
import sys

MARKER = re.compile(r"^<!-- adsc-llava-help (?P<command>[a-z]*) ?-->$", re.MULTILINE)
# Help is wrapped at this width, whatever the terminal that builds the site.
COLUMNS = 100

# One process imports the CLI once and prints every command's help as one JSON line (the last line of its output).
_RENDER_ALL = """
import contextlib, io, json
from adsc_llava.cli import SUBCOMMANDS, main

helps = {}
for command in ["", *SUBCOMMANDS]:
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            main([command, "--help"] if command else ["--help"])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    helps[command] = buffer.getvalue()
print(json.dumps(helps))
"""

_cache: dict[str, str] = {}


def cli_help() -> dict[str, str]:
    """`adsc-llava --help` (key `""`) and `adsc-llava COMMAND --help` for every subcommand (key `COMMAND`)."""
    if not _cache:
        completed = subprocess.run(
            [sys.executable, "-c", _RENDER_ALL],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "COLUMNS": str(COLUMNS)},
        )
        if completed.returncode != 0:
            raise RuntimeError(f"rendering `adsc-llava --help` failed:\n{completed.stderr[-3000:]}")
        helps = json.loads(completed.stdout.strip().splitlines()[-1])
        empty = [command or "(none)" for command, text in helps.items() if not text.strip()]
        if empty:
            raise RuntimeError(f"`adsc-llava COMMAND --help` printed nothing for: {', '.join(empty)}")
        _cache.update(helps)
    return _cache


def on_page_markdown(markdown: str, page, config, files) -> str:
    if not MARKER.search(markdown):
        return markdown
    helps = cli_help()

    def render(match: re.Match) -> str:
        command = match.group("command")
        if command not in helps:
            raise ValueError(
                f"{page.file.src_path}: no `adsc-llava {command}` command; known: {', '.join(filter(None, helps))}"
            )
        return f"```text\n{helps[command].rstrip()}\n```"

    return MARKER.sub(render, markdown)
