"""docs/cli.md, generated from the command line itself: every command, argument and option with its
default and help text. The method options come from the method registry through the commands that
take them, so a new method's options appear without editing anything here.

    python -m vit2trt.cli_reference            # rewrite docs/cli.md
    python -m vit2trt.cli_reference --check    # exit 1 when docs/cli.md is out of date
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import click
import typer

from .cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
REGENERATE = "python -m vit2trt.cli_reference"


def render() -> str:
    group = typer.main.get_command(app)
    root = click.Context(group, info_name="vit2trt")
    lines = ["# Command reference", "",
             f"Generated from the command line by `{REGENERATE}`; `vit2trt COMMAND --help` prints the same.", "",
             inspect.cleandoc(group.help or ""), "",
             "Every command also takes `--debug` before it (`vit2trt --debug convert ...`): a full traceback",
             "instead of a one-line error. A bad file or option ends with exit code 2 and one message.", ""]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        context = click.Context(command, info_name=name, parent=root)
        arguments = [p.name.upper() for p in command.params if p.param_type_name == "argument"]
        usage = " ".join([f"vit2trt {name} [OPTIONS]", *arguments])
        lines += [f"## vit2trt {name}", "", "```", usage, "```", "", inspect.cleandoc(command.help or ""), ""]
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            lines.append(_param_line(param, context))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _param_line(param: click.Parameter, context: click.Context) -> str:
    if param.param_type_name == "argument":
        required = "" if param.required else " (optional)"
        return f"- `{param.name.upper()}`{required}: {_one_line(getattr(param, 'help', '') or '')}"
    names, text = param.get_help_record(context) or (", ".join(param.opts), "")
    return f"- `{names}`: {_one_line(text)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date; regenerate it with `{REGENERATE}`.", file=sys.stderr)
            sys.exit(1)
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
