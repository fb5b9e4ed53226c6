"""How ``--help`` looks: descriptions wrapped to the terminal, example lines kept as written.

Every command's parser has a description for users (what it does, in a sentence or three) and an epilog of
examples (``examples(...)``); tests/test_help.py walks the whole command tree and checks both.
"""

from __future__ import annotations

import argparse
import textwrap


class Formatter(argparse.HelpFormatter):
    """Wrap prose; keep lines that start with a space (commands, examples) and headings ending in ':' as
    they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.splitlines():
            if not line.strip() or line.startswith(" ") or line.endswith(":"):
                out.append(indent + line)
            else:
                out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(out)


def examples(*lines: str) -> str:
    """An epilog of example command lines (each may end with a '#' comment)."""
    return "examples:\n" + "\n".join("  " + line for line in lines)
