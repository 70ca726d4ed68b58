"""demo: the whole job on a tiny model trained on the spot."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where to put the demo's files (default: a temporary folder, removed afterwards).")
def demo(workdir: Path | None) -> None:
    """Run the whole job on a tiny model built on the spot (no downloads, a few seconds)."""
    import tempfile

    from abliterate.demo.run import run_demo

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        run_demo(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="abliterate-demo-") as tmp:
        run_demo(Path(tmp))
