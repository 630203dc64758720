"""The README's commands are the newcomer's way in: every `fnemm ...` line in its shell
blocks must parse with today's CLI (a renamed or dropped flag fails here, not on a
reader's machine), and every `make TARGET` it names must be a target of the Makefile."""

import re
import shlex
from pathlib import Path

from fnemm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SEPARATORS = {"&&", "||", "|", ";"}


def shell_commands(markdown: str) -> list[list[str]]:
    """The simple commands of the markdown's ```sh / ```bash blocks, as argv lists
    (continuation lines joined, comments dropped, split at && || | ;)."""
    commands = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv: list[str] = []
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)   # `demo;` is `demo` `;`
            lexer.whitespace_split = True
            for token in list(lexer) + [";"]:
                if token in SEPARATORS:
                    if argv:
                        commands.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return commands


def fnemm_commands(commands: list[list[str]]) -> list[list[str]]:
    """The arguments after `fnemm` (or `.venv/bin/fnemm`), but for lines that elide some
    with `...` (a shortened example, not a command to run)."""
    out = []
    for argv in commands:
        at = next((k for k, word in enumerate(argv) if word == "fnemm" or word.endswith("/fnemm")), None)
        if at is not None and "..." not in argv:
            out.append(argv[at + 1:])
    return out


def refused(parser, commands: list[list[str]]) -> list[str]:
    """The commands the parser refuses (argparse exits on them), as lines."""
    bad = []
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            bad.append("fnemm " + " ".join(argv))
    return bad


def test_shell_commands_are_split_as_a_shell_would():
    text = ("```sh\nfnemm index build --out x \\\n  --dataset d && fnemm serve --index x   # then open it\n"
            "make demo; echo 'a # b' | wc\n```\n```text\nfnemm not --a command\n```\n")
    assert shell_commands(text) == [["fnemm", "index", "build", "--out", "x", "--dataset", "d"],
                                    ["fnemm", "serve", "--index", "x"], ["make", "demo"], ["echo", "a # b"],
                                    ["wc"]]
    assert fnemm_commands([["fnemm", "train", "..."], [".venv/bin/fnemm", "presets"], ["make", "x"]]) == \
        [["presets"]]


def test_every_fnemm_command_in_the_readme_parses():
    commands = fnemm_commands(shell_commands((ROOT / "README.md").read_text()))
    assert len(commands) >= 30, "the README's examples were found"
    assert refused(build_parser(), commands) == [], "README commands today's CLI refuses"


def test_a_dropped_flag_or_value_is_refused():
    ok = ["train", "--preset", "demo/FNE-MH", "--dataset", "d.jsonl", "--features", "f", "--out", "r"]
    assert refused(build_parser(), [ok, ok + ["--no-such-flag"], ["extract", "--out", "x", "--post", "centre"]]) == \
        ["fnemm " + " ".join(ok + ["--no-such-flag"]), "fnemm extract --out x --post centre"]


def test_every_make_target_the_readme_names_is_in_the_makefile():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {word for argv in shell_commands((ROOT / "README.md").read_text()) if argv[0] == "make"
             for word in argv[1:] if "=" not in word and not word.startswith("-")}
    assert named and named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def help_examples(parser) -> str:
    """The `fnemm ...` example lines (with their continuation lines) of every command's
    --help description and epilog, as one shell block."""
    import argparse

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)
    lines, going = [], False
    for p in parsers(parser):
        for line in f"{p.description or ''}\n{p.epilog or ''}".splitlines():
            line = line.strip()
            if going or line.startswith("fnemm "):
                lines.append(line)
            going = (going or line.startswith("fnemm ")) and line.endswith("\\")
    return "```sh\n" + "\n".join(lines) + "\n```\n"


def test_every_example_in_the_clis_help_parses():
    parser = build_parser()
    commands = fnemm_commands(shell_commands(help_examples(parser)))
    assert len(commands) >= 10, "the --help examples were found"
    assert refused(parser, commands) == [], "--help examples today's CLI refuses"


def test_the_readmes_links_lead_somewhere():
    """Links to its own sections (GitHub's heading anchors) and to files of the repository."""
    body = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", body, re.M)}
    sections = re.findall(r"\]\(#([^)]+)\)", body)
    files = [f.split("#")[0] for f in re.findall(r"\]\((?!#|https?:)([^)]+)\)", body)]
    assert sections and "when-the-fne-helps" in anchors
    assert [s for s in sections if s not in anchors] == [], "README links to sections it does not have"
    assert [f for f in files if not (ROOT / f).exists()] == [], "README links to files the repository lacks"


def test_the_readme_reading_of_the_benchmark_quotes_the_committed_statistics():
    """The benchmark's reading ("What it shows", written by hand after each export)
    quotes intervals: each must be one the committed report holds, so a number left from an
    earlier export (a second seed changes every interval of its rows) fails here."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("What it shows: ")
    reading = " ".join(readme[start:readme.index("\n\n", start)].split())
    report = " ".join((ROOT / "results" / "flickr8k-224" / "study.md").read_text().split())
    quoted = re.findall(r"\[[+-]?\d+\.\d, [+-]?\d+\.\d\]", reading)
    assert len(quoted) >= 4, "the reading quotes the benchmark's intervals"
    stale = [q for q in quoted if q not in report]
    assert not stale, f"README's reading of the benchmark quotes intervals results/flickr8k-224/study.md " \
                      f"does not hold (stale after an export?): {stale}"
