"""docs/cli.md is the command line's own description, kept current."""
from __future__ import annotations

from vit2trt.cli_reference import DOC, REGENERATE, render
from vit2trt.passes.methods import REGISTRY, option_fields


def test_docs_cli_md_is_current():
    assert DOC.is_file() and DOC.read_text() == render(), f"docs/cli.md is out of date: run `{REGENERATE}`"


def test_every_command_and_every_method_option_is_described():
    text = render()
    for command in ("export", "inspect", "convert", "plan", "tune-thresholds", "validate", "bench", "demo"):
        assert f"## vit2trt {command}\n" in text
    convert = text.split("## vit2trt convert\n")[1].split("\n## ")[0]
    for method in REGISTRY.values():
        for field in option_fields(method.Options):
            assert f"`{field.metadata['flag']}" in convert, (method.name, field.metadata["flag"])
    assert "[default: 13]" in convert   # defaults and help text come through
