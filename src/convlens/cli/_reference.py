"""The command-line reference as Markdown, generated from the click commands themselves
(the documentation site's ``docs/cli.md`` is this function's output, so an option is
never described twice).

Example:
    >>> from convlens.cli._reference import markdown
    >>> "## convlens tour" in markdown()
    True
"""

from __future__ import annotations

import inspect

import click

__all__ = ["commands", "markdown"]


def commands(group: click.Group | None = None) -> dict[str, click.Command]:
    """Every command under ``group`` (default ``convlens``'s), by its full path
    (``"convlens tour"``), in alphabetical order.

    Example:
        >>> "convlens microscope" in commands()
        True
    """
    if group is None:
        from convlens.cli import main

        group = main
    out: dict[str, click.Command] = {}

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], f"{path} {name}")
        else:
            out[path] = cmd

    walk(group, "convlens")
    return out


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell (pipes escaped, one line, no HTML)."""
    return (
        " ".join(text.split())
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
    )


def _option_row(ctx: click.Context, p: click.Parameter) -> str:
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    kind = p.type.name.upper() if not isinstance(p.type, click.Choice) else ""
    if isinstance(p.type, click.Choice):
        kind = " \\| ".join(f"`{c}`" for c in p.type.choices)
    if isinstance(p, click.Option) and p.is_flag:
        kind = "flag"
    default = ""
    if isinstance(p, click.Option) and p.show_default is not False:
        value = p.get_default(ctx, call=False)
        unset = "UNSET" in repr(value)  # click 8.3's sentinel for "no default"
        if value not in (None, False, (), "") and not callable(value) and not unset:
            default = f"`{value}`"
    help_text = getattr(p, "help", None) or ""
    return f"| {names} | {kind} | {default} | {_cell(help_text)} |"


def markdown(group: click.Group | None = None) -> str:
    """The reference: for each command its usage line, its help text, its arguments and
    a table of its options (names, type or choices, default, help).

    Example:
        >>> print(markdown().splitlines()[0])
        # Command line
    """
    cmds = commands(group)
    lines = [
        "# Command line",
        "",
        "Generated from the click commands of this version of convlens (`convlens COMMAND "
        "--help` prints the same). Every command takes `--out DIR` and `--device`, prints "
        "what it wrote, and exits with status 2 and a one-line reason on bad input.",
        "",
        *(f"- [`{path}`](#{path.replace(' ', '-')})" for path in cmds),
        "",
    ]
    for path, cmd in cmds.items():
        ctx = click.Context(cmd, info_name=path)
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines += [f"## {path}", "", "```text", f"{path} {usage}", "```", ""]
        help_text = inspect.cleandoc((cmd.help or "").split("\f")[0])
        if help_text:
            text = click.unstyle(help_text).replace("\b\n", "")
            lines += [text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"), ""]
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        if args:
            lines.append("Arguments: " + ", ".join(f"`{a.make_metavar(ctx)}`" for a in args))
            lines.append("")
        opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
        if opts:
            lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
            lines += [_option_row(ctx, p) for p in opts]
            lines.append("")
    return "\n".join(lines)
