"""``make demo``: start the embedded stack, import the bundled samples, print, stop.

Run it twice: the second time every row is reported unchanged.
"""

from __future__ import annotations

import asyncio
import sys
from importlib import resources
from pathlib import Path

from sluice.cli.common import ProgressBar, load_settings, summary
from sluice.config import PipelineSettings
from sluice.schemas.runs import RunStatus
from sluice.service import Client
from sluice.stack import read_state
from sluice.supervisor import start_detached, stop_detached

SAMPLES = (
    ("products", "products.csv", "a product catalogue keyed by SKU, with a few bad rows"),
    ("meter_readings", "meter_readings.csv", "half-hourly readings, 48 columns unpivoted"),
    ("daily_readings", "daily_readings.csv", "daily readings, one row per meter and day"),
)


async def import_samples() -> bool:
    ok = True
    async with Client(load_settings()) as client:
        for slug, name, what in SAMPLES:
            path = Path(str(resources.files("sluice") / "samples" / name))
            print(f"\n== {slug}: {what}\n   sluice run {slug} --file {path} --wait")
            run = await client.submit_file(slug, path, requested_by="demo")
            run = await client.wait(run.id, timeout=300, on_update=ProgressBar(sys.stderr.isatty()))
            print(summary(run))
            if run.failed_rows:
                for failure in await (await client.deps()).runs.failed_rows(run.id, limit=5):
                    print(f"    row {failure.row_number}: {failure.reason}")
            ok = ok and run.status in (RunStatus.COMPLETED, RunStatus.COMPLETED_WITH_ERRORS)
    return ok


def main() -> int:
    home = PipelineSettings().home
    started_here = read_state(home) is None
    if started_here:
        print(f"starting the embedded stack under {home.resolve()} ...")
        if start_detached(home) != 0:
            return 1
    try:
        ok = asyncio.run(import_samples())
    finally:
        if started_here:
            stop_detached(home)
    print("\ndone: run `make demo` again and every row shows as unchanged.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
