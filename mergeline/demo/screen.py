"""The demo's closing screen: where its files are, how long each stage took, and what to run next."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.text import Text


def closing_panel(report: dict) -> Panel:
    seconds = report["seconds"]
    stages = ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items() if stage != "total")
    lines = Text.assemble(
        ("store  ", "bold"), f"{report['store']}  (a folder store: one lineage per method)\n",
        ("jobs   ", "bold"), f"{report['jobs']}  (the job spec of every merge, for `mergeline merge` or `submit`)\n",
        ("time   ", "bold"), f"{seconds['total']:.0f} s on {report['threads']} torch thread(s): {stages}",
    )
    return Panel(lines, title="mergeline demo: done", title_align="left", expand=False)


def print_next_commands(console: Console, report: dict) -> None:
    """Each command on one line of its own (soft-wrapped, never broken), so that it copies as printed."""
    console.print("Next:", style="bold")
    for step in report["next"]:
        console.print(Text(f"  # {step['what']}", style="dim"))
        console.print(f"  {step['command']}", markup=False, highlight=False, soft_wrap=True)
