"""What rank 0 shows on its terminal: a progress bar (kimg, img/s, losses, ETA) and log lines.

Every line printed is also appended to the run dir's log.txt, so a run's story survives the terminal. Other
ranks print nothing, except errors.
"""

from __future__ import annotations

import sys
from pathlib import Path


class Console:
    def __init__(self, enabled: bool, log_path: Path | None = None, bar: str = "auto"):
        self.enabled = enabled
        self.log_path = log_path
        self.show_bar = enabled and (bar == "bar" or (bar == "auto" and sys.stderr.isatty()))
        self._bar = None

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(msg + "\n")

    def start_bar(self, total_nimg: int, cur_nimg: int) -> None:
        if not self.show_bar:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_nimg / 1000,
            initial=min(cur_nimg, total_nimg) / 1000,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} kimg [{elapsed}<{remaining}{postfix}]",
        )

    def advance(self, cur_nimg: int, postfix: dict[str, str] | None = None) -> None:
        if self._bar is None:
            return
        if postfix is not None:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(min(cur_nimg / 1000, self._bar.total) - self._bar.n)  # never past the total

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
