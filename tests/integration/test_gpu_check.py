"""`distgan gpu-check --dry`: the GPU check, run on the CPU with tiny sizes, so that it works the day a GPU is there.

Every row must pass (exit 0), the table and the JSON must list all of them, and a broken row must fail the command
(exit 1): the control makes the stop-and-resume row fail by resuming into a run dir whose checkpoint differs.
"""

import json
import subprocess
import sys

import pytest

from conftest import cli_env, patience

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = ["train fp32 +R1+PL", "train bf16 +R1+PL", "train fp16 +R1+PL", "stop + resume", "zero2 bf16",
        "torchrun 1 process", "generate", "host syncs / step", "img/s"]  # fmt: skip


def test_gpu_check_dry_runs_every_row_on_the_cpu(tmp_path):
    from conftest import require_deepspeed

    require_deepspeed()
    p = subprocess.run([sys.executable, "-m", "distgan.cli", "gpu-check", "--dry", "--out", str(tmp_path / "gc")],
                       env=cli_env(), capture_output=True, text=True, timeout=patience(1200))  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("\ncheck ") :]
    for name in ROWS:
        assert any(line.startswith(name) and " ok " in line for line in table.splitlines()), (name, table)
    assert "host syncs / step   ok      per step: fp32 0, bf16 0, fp16 0" in table
    record = json.loads((tmp_path / "gc" / "gpu-check.json").read_text())
    assert record["ok"] and record["dry"] and [r["check"] for r in record["rows"]] == ROWS
    print(table)


def test_a_failing_row_fails_the_command(tmp_path):
    """Control: with the stop fault aimed past the end, the run finishes instead of stopping: that row fails, the
    command exits 1 and names it."""
    code = (
        "import sys\n"
        "from distgan.bench import gpu_check\n"
        "gpu_check.Check.run = lambda self: (self.row('stop + resume', self.stop_and_resume), "
        "all(r.ok for r in self.rows))[1]\n"
        "gpu_check.DRY.steps = 4\n"
        "orig = gpu_check.Check.env\n"
        "gpu_check.Check.env = lambda self, **kw: orig(self, **{k: 'usr1:step=99' for k in kw})\n"
        f"sys.exit(gpu_check.main(['--dry', '--out', {str(tmp_path / 'gc')!r}]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=patience(600)
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "failed: stop + resume" in p.stdout and "the stop (SIGUSR1) should exit 3: exit code 0" in p.stdout
