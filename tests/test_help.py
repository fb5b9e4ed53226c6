"""Every command's --help is written for users: walks the whole argparse tree (every command and subcommand)
and checks a one-line summary in the command list, a description, at least one example that parses, and no
developer markup (reStructuredText, docstrings)."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from dcmon.cli import build_parser, main

MARKUP = re.compile(r"``|:(func|class|meth|mod|data|attr|ref):|\.\. \w+::|^\s*(Args|Returns|Raises):", re.M)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def summaries(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield path + (name,), helps.get(name)
                yield from summaries(sub, path + (name,))


TREE = list(walk(build_parser()))


def test_the_tree_is_complete():
    names = {" ".join(p) for p, _ in TREE}
    for cmd in ("run", "check-config", "simulate", "status", "scan", "set-address", "shunt get", "shunt set",
                "reset-energy", "read", "watch", "calibrate", "check-accuracy", "spool", "spool status",
                "spool export", "spool quarantine list", "spool quarantine retry", "spool quarantine clear",
                "grafana-import"):
        assert cmd in names, f"dcmon {cmd} is missing from the tree"


@pytest.mark.parametrize("path, summary", list(summaries(build_parser())), ids=lambda x: " ".join(x) if isinstance(x, tuple) else None)
def test_each_command_has_a_one_line_summary(path, summary):
    assert summary and "\n" not in summary and len(summary) <= 100, f"dcmon {' '.join(path)}: summary {summary!r}"


@pytest.mark.parametrize("path, parser", TREE, ids=lambda x: " ".join(x) or "dcmon" if isinstance(x, tuple) else None)
def test_each_help_has_a_description_and_examples_that_parse(path, parser):
    name = " ".join(("dcmon",) + path)
    text = parser.format_help()
    assert parser.description and len(parser.description) > 20, f"{name}: no description"
    assert not MARKUP.search(text), f"{name} --help shows developer markup: {MARKUP.search(text).group(0)!r}"
    assert parser.epilog and parser.epilog.startswith("examples:"), f"{name}: no examples"
    examples = [line.strip() for line in parser.epilog.splitlines()[1:] if line.strip()]
    assert examples, f"{name}: no example lines"
    own = 0
    for ex in examples:
        argv = shlex.split(ex.split("  #")[0].split(" ||")[0])
        if argv[:2] == ["sudo", "-u"]:
            argv = argv[3:]
        argv = argv[1:] if argv[0] == "sudo" else argv
        assert argv[0] == "dcmon", f"{name}: example {ex!r} is not a dcmon command"
        own += argv[1:1 + len(path)] == list(path)
        build_parser(argv[1:]).parse_args(argv[1:])  # SystemExit (with argparse's message) if it does not parse
    assert own, f"{name}: none of its examples is of this command"


def test_help_exits_0_for_every_command(capsys):
    for path, _ in TREE:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: dcmon") and "examples:" in out
