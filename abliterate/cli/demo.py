"""demo: the whole job on a tiny model trained on the spot."""

from __future__ import annotations

from pathlib import Path

import click

from abliterate.options.declared import click_options, from_params
from abliterate.options.families import DemoOptions


@click.command()
@click_options(DemoOptions)
def demo(**params) -> None:
    """Run the whole job on a tiny model built on the spot (no downloads, a few seconds)."""
    import tempfile

    from abliterate.demo.run import run_demo

    workdir = from_params(DemoOptions, params).workdir
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run_demo(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="abliterate-demo-") as tmp:
        run_demo(Path(tmp))
