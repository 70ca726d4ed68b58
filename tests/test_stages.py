"""Stage records: wall time and a peak RSS of each stage's own (Linux resets the high-water mark per stage)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from abliterate.jobs.stages import Stages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-stage peaks need /proc/self/clear_refs")
def test_each_stage_has_its_own_peak_rss_and_wall_time():
    stages = Stages()
    with stages.stage("big"):
        block = np.ones(300 << 20, dtype=np.uint8)  # 300 MB touched
        del block
    with stages.stage("small"):
        time.sleep(0.05)
    big, small = stages.records
    assert stages.per_stage_rss
    assert big.peak_rss - small.peak_rss > 250 << 20  # the second stage does not inherit the first one's peak
    assert small.seconds >= 0.05
    table = stages.table()
    assert table.splitlines()[0].split() == ["stage", "wall", "time", "peak", "RSS"] and "total" in table
    assert [row.stage for row in stages.card_rows()] == ["big", "small"]


def test_card_shows_the_stages_with_a_gpu_column_only_when_a_stage_ran_on_cuda():
    from abliterate.publish.card import StageRow, stages_section

    cpu = stages_section((StageRow("load", "1.0 s", "1.2 GB"), StageRow("extract", "2 min 03 s", "1.4 GB")))
    assert cpu[1:] == ["| stage | wall time | peak RSS |", "|---|---|---|", "| load | 1.0 s | 1.2 GB |",
                       "| extract | 2 min 03 s | 1.4 GB |"]
    gpu = stages_section((StageRow("fetch", "3.0 s", "300.0 MB"), StageRow("load", "1.0 s", "1.2 GB", "3.1 GB")))
    assert gpu[1] == "| stage | wall time | peak RSS | peak GPU memory |" and gpu[3].endswith("| - |")
    assert stages_section(()) == []
