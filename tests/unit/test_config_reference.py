"""docs/config-reference.md is generated from the config dataclasses (distgan/config_reference.py): the checked-in
page must be what `make docs` writes now, and `distgan config-reference --check` must notice a page that is not."""

import subprocess
import sys
from pathlib import Path

from distgan import cli, config, config_reference

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "config-reference.md"


def test_checked_in_page_is_current():
    # In a fresh interpreter: a test that registers a toy model family in this one must not make the page "stale".
    code = "from distgan.config_reference import render; import sys; sys.stdout.write(render())"
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert PAGE.exists(), "docs/config-reference.md is missing: run `make docs`"
    assert PAGE.read_text() == fresh, (
        "docs/config-reference.md is stale (the config dataclasses changed): run `make docs` and commit the page"
    )


def test_every_key_has_a_row_with_its_doc():
    page = config_reference.render()
    for key, info in config.field_index().items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert row.count(" | ") == 3, row  # four cells: no unescaped | inside one
        assert row.endswith(f" | {config_reference._cell(info.doc)} |"), (key, row)


def test_check_detects_a_stale_page(tmp_path, capsys):
    current = tmp_path / "current.md"
    current.write_text(config_reference.render())
    # The control: the page as it would be written passes, through the `distgan` command's own dispatch.
    assert cli.main(["config-reference", "--out", str(current), "--check"]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(current.read_text().replace("| `train.batch` |", "| `train.batches` |", 1))
    assert stale.read_text() != current.read_text()
    capsys.readouterr()
    assert cli.main(["config-reference", "--out", str(stale), "--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stale" in err[0] and "make docs" in err[0], err
    assert cli.main(["config-reference", "--out", str(tmp_path / "absent.md"), "--check"]) == 1


def test_writes_the_page(tmp_path):
    out = tmp_path / "docs" / "ref.md"
    assert config_reference.main(["--out", str(out)]) == 0
    assert out.read_text() == config_reference.render()


def test_three_level_keys_form_their_own_sub_section(monkeypatch):
    # Model families have sections of their own (model.dcgan.g_width): grouped by the part before the last dot,
    # under their parent section, in a table of their own.
    index = dict(config.field_index())
    info = config.FieldInfo(int, 7, "a toy family's width")
    extra = {"model.toyfam.width": info, "model.toyfam.inner.depth": info}
    monkeypatch.setattr(config, "field_index", lambda: {**index, **extra})
    page = config_reference.render()
    lines = page.splitlines()
    heads = [line for line in lines if line.startswith("#")]
    assert "### `model.toyfam`" in heads and "#### `model.toyfam.inner`" in heads
    assert heads.index("## `model`") < heads.index("### `model.toyfam`") < heads.index("## `loss`")
    section = lines[lines.index("### `model.toyfam`") :]
    section = section[: next(i for i, line in enumerate(section[1:], 1) if line.startswith("#"))]
    assert [line.split(" | ")[0] for line in section if line.startswith("| `")] == ["| `model.toyfam.width`"]
    model = lines[lines.index("## `model`") :]
    model = model[: next(i for i, line in enumerate(model[1:], 1) if line.startswith("#"))]
    assert not any("toyfam" in line for line in model)


def test_section_intro_is_the_dataclass_docstring_not_its_signature():
    page = config_reference.render()
    eval_doc = " ".join(config.EvalConfig.__doc__.split("\n\n")[0].split())
    assert eval_doc in page
    assert "LossConfig(" not in page and "Config(" not in page
