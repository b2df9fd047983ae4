"""The documentation as readers meet it: the site builds with warnings as errors, README stays short and its links
resolve, and the `adsc-llava` commands that README and the pages show name real options (the cheap ones run)."""

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from markdown.extensions.toc import slugify

from adsc_llava.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").rglob("*.md"))
README_LIMIT_BYTES = 10 * 1024
# What the API reference must hold, by the anchors mkdocstrings gives them (module paths as griffe reads the source).
API_OBJECTS = (
    "configuration_adsc_llava.AdscLlavaConfig",
    "configuration_adsc_llava.AdscScheduleMixin.with_budget",
    "configuration_adsc_llava_next.AdscLlavaNextConfig",
    "configuration_adsc_llava_onevision.AdscLlavaOnevisionConfig",
    "modeling_adsc_llava.AdscLlavaForConditionalGeneration",
    "modeling_adsc_llava_next.AdscLlavaNextForConditionalGeneration",
    "modeling_adsc_llava_onevision.AdscLlavaOnevisionForConditionalGeneration",
    "modeling_adsc_llava.AdscCache",
    "configuration_adsc_llava.uniform_keep_positions",
    "modeling_adsc_llava.plan_stages",
    "adsc_llava.register_auto_classes",
)
MKDOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}


def load_cli_help_hook():
    spec = importlib.util.spec_from_file_location("cli_help", ROOT / "docs" / "hooks" / "cli_help.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mkdocs_build(config_file: Path, site_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_file)]
    return subprocess.run(
        [*command, "--site-dir", str(site_dir)], capture_output=True, text=True, timeout=600, env=MKDOCS_ENV
    )


def bash_lines(path: Path) -> list[str]:
    """The commands of a Markdown file's ```bash blocks: continuations joined, comments dropped."""
    lines, in_block = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if in_block:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1].rstrip() + " " + line.strip()
            else:
                lines.append(line.strip())
    return [re.split(r"\s#\s", line)[0].strip() for line in lines if line.strip()]


def documented_invocations() -> list[tuple[str, list[str]]]:
    """Every `adsc-llava ...` (or `-m adsc_llava ...`) in README's and the pages' bash blocks, as (where, argv).

    Optional parts written `[--flag VALUE]` or `a | b` keep their words: each is checked as an option name."""
    invocations = []
    for path in (README, *DOC_PAGES):
        for line in bash_lines(path):
            match = re.search(r"(?:^|\s)(?:\S*/)?adsc-llava\s+(.*)$|\s-m\s+adsc_llava\s+(.*)$", line)
            if match:
                words = shlex.split((match.group(1) or match.group(2)).replace("[", " ").replace("]", " "))
                invocations.append((f"{path.relative_to(ROOT)}: {line}", [w for w in words if w != "|"]))
    return invocations


def command_of(argv: list[str]) -> str:
    """The subcommand an argv runs; "" for `adsc-llava --help` itself."""
    return "" if argv[0].startswith("-") else argv[0]


def is_cheap(argv: list[str]) -> bool:
    return "--help" in argv or (argv[0] == "cost" and "--measure" not in argv)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`adsc-llava ARGV` in this process (the console script is `adsc_llava.cli:main`): exit code and stdout."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            code = main(argv)
    except SystemExit as exit:  # --help, or a usage error (2)
        code = exit.code or 0
    return code, output.getvalue()


@pytest.fixture(scope="module")
def cli_help() -> dict[str, str]:
    return load_cli_help_hook().cli_help()


def test_site_builds_strictly(tmp_path):
    """Every page, the API reference from the docstrings and each command's --help; any warning fails the build."""
    completed = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert completed.returncode == 0, completed.stderr[-5000:]
    for page in DOC_PAGES:
        built = tmp_path / "site" / page.relative_to(ROOT / "docs").with_suffix("")
        assert (built if page.name != "index.md" else built.parent).is_dir(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for object_id in API_OBJECTS:
        assert f'id="{object_id}"' in api, f"{object_id} is not in the API reference"
    assert "reachable range" in api  # with_budget's docstring, its Raises section included
    for command in SUBCOMMANDS:
        assert f"usage: adsc-llava {command}" in api, command


def test_strict_build_fails_on_a_broken_link_or_anchor(tmp_path):
    """The site's link validation is on: a missing page or heading is an error under --strict, not a quiet 404."""
    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other\n\n## A heading\n")
    config = {"site_name": "t", "theme": settings["theme"], "validation": settings["validation"]}
    for link, should_build in (("other.md#a-heading", True), ("other.md#no-such-heading", False), ("none.md", False)):
        (docs / "index.md").write_text(f"# Home\n\n[there]({link})\n")
        (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
        completed = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
        assert (completed.returncode == 0) == should_build, (link, completed.stderr[-2000:])


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.encode()) < README_LIMIT_BYTES, f"README.md is {len(text.encode())} bytes"
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 10
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else README
        assert path.exists(), f"README links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
            slugs = {slugify(re.sub(r"[`*]", "", heading), "-") for heading in headings}
            assert anchor in slugs, f"README links to {link}: no such heading in {target or 'README.md'}"


def test_documented_commands_use_real_options(cli_help):
    """Each `adsc-llava COMMAND --option` shown in a bash block is an option that COMMAND's --help lists."""
    invocations = documented_invocations()
    assert len(invocations) >= 20, invocations
    assert {command_of(argv) for _, argv in invocations} >= set(SUBCOMMANDS), "a command without an example"
    for where, argv in invocations:
        command = command_of(argv)
        assert command in cli_help, f"{where}: no such command"
        for option in (word.split("=")[0] for word in argv if word.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", cli_help[command]), f"{where}: {option}?"


def test_cheap_documented_commands_run(tmp_path, monkeypatch):
    """The `--help` and `cost` commands of README and the pages run as written and print what they should."""
    monkeypatch.chdir(tmp_path)  # for files a command writes, such as --plot
    cheap = [(where, argv) for where, argv in documented_invocations() if is_cheap(argv)]
    assert sum(argv[0] == "cost" for _, argv in cheap) >= 5 and any("--help" in argv for _, argv in cheap)
    for where, argv in cheap:
        code, text = run_cli(argv)
        assert code == 0, where
        expected = ["usage: adsc-llava"] if "--help" in argv else ["| budget |", "TFLOPs"]
        assert all(part in text for part in expected), where


def first_table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `markdown`, as lists of stripped cells."""
    lines = markdown[markdown.index("\n|") + 1 :].split("\n\n", 1)[0].splitlines()
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def test_table_iv_on_the_cost_page_is_what_cost_prints():
    """The cost page's Table IV (budget, r, tokens per layer, TFLOPs, vs stock) is `adsc-llava cost`'s output today."""
    page = (ROOT / "docs" / "cost.md").read_text()
    rows = first_table_rows(page[page.index("## Cost (Table IV)") :])
    code, printed = run_cli(["cost"])
    assert code == 0 and len(rows) == 4
    for row, printed_row in zip(rows, first_table_rows(printed), strict=True):
        assert row[:4] == printed_row[:4] and row[4] in (printed_row[4], ""), (row, printed_row)
