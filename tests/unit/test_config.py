import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distgan.config import Config, from_dict, load_config, to_yaml, world_sizes_for
from distgan.errors import ConfigError
from support import SMOKE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    Config().validate()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path).validate()
    assert cfg.name == path.stem


def test_required_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "default", "dcgan_mnist"} <= names


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.total_kimg=50",
            "optim.lr_g=1e-4",
            "data.xflip=true",
            "train.batch=32",
            "model.dcgan.norm=none",
            "name=x",
        ],
    )
    assert cfg.train.total_kimg == 50.0 and isinstance(cfg.train.total_kimg, float)
    assert cfg.optim.lr_g == 1e-4  # YAML 1.1 reads "1e-4" as a string; the typed field turns it into a float
    assert cfg.data.xflip is True
    assert cfg.train.batch == 32 and isinstance(cfg.train.batch, int)
    assert cfg.model.options.norm == "none"
    assert cfg.name == "x"


def test_unknown_keys_are_all_named_with_nearest_valid_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  total_kimgs: 5\n  bach: 3\nmodel:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.lr=1"])
    msg = str(e.value)
    assert "\n" not in msg
    for bad, good in [
        ("train.total_kimgs", "train.total_kimg"),
        ("train.bach", "train.batch"),
        ("model.resolutoin", "model.resolution"),
    ]:
        assert f"'{bad}' (did you mean '{good}'?)" in msg
    assert "'optim.lr'" in msg


def test_leaf_name_without_section_is_suggested():
    with pytest.raises(ConfigError, match=r"'total_kimg' \(did you mean 'train.total_kimg'\?\)"):
        load_config(None, ["total_kimg=3"])


@pytest.mark.parametrize(
    "override, phrase",
    [
        (["train.batch=63"], "not divisible by the 2 processes"),
        (["optim.lr_d=0"], "optim.lr_d=0.0 must be > 0"),
        (["optim.lr_g=-1e-4"], "optim.lr_g=-0.0001 must be > 0"),
        (["model.resolution=48"], "model.resolution=48 cannot be made by dcgan"),
        (["model.channels=1"], "data.source=shapes has 3 channels"),
        (["loss.n_critic=0"], "loss.n_critic=0 must be >= 1"),
        (["optim.beta1=1.0"], "optim.beta1=1.0 must be in [0, 1)"),
    ],
)
def test_invalid_values(override, phrase):
    with pytest.raises(ConfigError) as e:
        load_config(None, override).validate(world_size=2)
    assert phrase in str(e.value)


def test_all_invalid_values_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lr_d=0", "train.batch=0", "model.resolution=40"]).validate()
    msg = str(e.value)
    assert "optim.lr_d" in msg and "train.batch" in msg and "model.resolution" in msg


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("train.precision=fp8", "is not one of ['auto', 'fp32', 'bf16', 'fp16']"),
        ("train.precision=no", "(YAML reads yes/no/on/off as booleans)"),
        ("train.batch=abc", "is not an integer"),
        ("train.batch=2.5", "is not an integer"),
        ("optim.lr_g=fast", "is not a number"),
        ("data.xflip=maybe", "is not a boolean"),
    ],
)
def test_wrong_types(override, phrase):
    with pytest.raises(ConfigError, match="invalid config values") as e:
        load_config(None, [override])
    assert phrase in str(e.value)


def test_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "dcgan_mnist.yaml", ["train.total_kimg=7.5", "loss.r1_gamma=0.2"])
    cfg.dump(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert again.digest() == cfg.digest()
    assert load_config(None, ["train.seed=1"]).digest() != Config().digest()


def test_yaml_python_tags_are_refused(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {canary}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not canary.exists()


def test_non_mapping_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_cli_bad_config_exits_2_before_importing_torch():
    # The whole validation path runs without torch (so it is fast and no process group can have started).
    code = (
        "import sys; from distgan.train import main\n"
        "rc = main(['--config', 'configs/smoke.yaml', 'train.batch=15', 'optim.lr_g=0'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"WORLD_SIZE": "2", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distgan: error: invalid config:")
    assert "train.batch=15 is not divisible by the 2 processes launched" in lines[0]
    assert "optim.lr_g=0.0 must be > 0" in lines[0]


@pytest.mark.parametrize(
    ("batch", "world", "resumed", "launch"),
    [
        (63, 2, None, "launch 1, 3, 7, 9, 21 or 63, or make train.batch a multiple of 2)"),
        (12, 8, 4, "launch 1, 2, 3, 4, 6 or 12; this start resumes a checkpoint made by 4 processes"),
        (7, 2, None, "launch 1 or 7, or make"),
        # Beyond 64 processes: the divisors up to 64 and the nearest ones around the launch (here 128 above it).
        (256, 96, None, "launch 1, 2, 4, 8, 16, 32, 64 or 128, or make train.batch a multiple of 96)"),
        (384, 100, None, "launch 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96 or 128, or make"),
        # A resume on the same number: not what is wrong, not said.
        (12, 8, 8, "launch 1, 2, 3, 4, 6 or 12, or make train.batch a multiple of 8)"),
    ],
    ids=["63-on-2", "12-on-8-resumed-from-4", "7-on-2", "256-on-96", "384-on-100", "12-on-8-resumed-from-8"],
)
def test_indivisible_batch_names_the_world_sizes_that_work(batch, world, resumed, launch):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"train.batch={batch}"]).validate(world_size=world, resumed_world=resumed)
    msg = str(e.value)
    assert f"invalid config: train.batch={batch} is not divisible by the {world} processes launched (train.batch is " \
           "the global batch, split over the processes: " in msg  # fmt: skip
    assert launch in msg, msg
    assert ("a resume on another number of processes keeps its global batch" in msg) == (resumed not in (None, world))
    # Every number offered works.
    for n in world_sizes_for(batch, world):
        load_config(None, [f"train.batch={batch}"]).validate(world_size=n)


def write_fake_checkpoint(run_dir: Path, nimg: int, ranks: int) -> Path:
    """A committed checkpoint's marker and manifest (no tensors: validation reads only the manifest)."""
    ckpt = run_dir / "checkpoints" / f"ckpt-{nimg:09d}"
    ckpt.mkdir(parents=True)
    files = {
        name: {"bytes": 1, "sha256": "0" * 64} for name in ["state.pt", *(f"rank-{r:05d}.pt" for r in range(ranks))]
    }
    (ckpt / "manifest.json").write_text(json.dumps({"format": "distgan-checkpoint", "version": 2, "files": files}))
    (ckpt / "COMMITTED").write_text("{}")
    return ckpt


def test_cli_indivisible_batch_on_a_resume_says_so_in_one_line_exit_2(tmp_path):
    """train.batch=12 made by 4 processes, resumed by 8 (a requeue or an elastic restart with another size): one
    line, exit code 2, before torch is imported; it names the numbers that work and the resume. Control: a fresh
    run dir gets the same line without the resume part, and `--resume none` does not look at the checkpoints."""
    run_dir = tmp_path / "run"
    write_fake_checkpoint(run_dir, 64, ranks=2)
    write_fake_checkpoint(run_dir, 128, ranks=4)  # the newest: the one `--resume latest` takes
    code = (
        "import sys; from distgan.train import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, "-c", code, "--config", "configs/smoke.yaml", "train.batch=12", *args],
                           cwd=REPO, capture_output=True, text=True,
                           env={"WORLD_SIZE": "8", "RANK": "0", "PATH": "/usr/bin:/bin"})  # fmt: skip
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("distgan: error: invalid config: train.batch=12 is not "
                                                       "divisible by the 8 processes launched"), p.stderr  # fmt: skip
        assert "launch 1, 2, 3, 4, 6 or 12" in lines[0], lines[0]
        return lines[0]

    resumed = "this start resumes a checkpoint made by 4 processes, and a resume on another number of processes"
    assert resumed in cli("--run-dir", str(run_dir))
    older = run_dir / "checkpoints" / "ckpt-000000064"
    assert "a checkpoint made by 2 processes" in cli("--run-dir", str(run_dir), "--resume", str(older))
    assert "resumes" not in cli("--run-dir", str(tmp_path / "fresh"))
    assert "resumes" not in cli("--run-dir", str(run_dir), "--resume", "none")


def test_help_config_lists_every_key():
    p = subprocess.run(
        [sys.executable, "-m", "distgan.train", "--help-config"], cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 0
    for key in (
        "train.total_kimg",
        "train.ckpt_every_kimg",
        "train.sample_every_kimg",
        "train.seed",
        "model.resolution",
        "loss.r1_gamma",
    ):
        assert key in p.stdout


def test_switching_the_family_on_the_command_line_drops_the_files_other_family_section():
    # configs/smoke.yaml has a model.dcgan section; model.family=r3gan on the command line builds R3GAN with its own
    # defaults (and keys of the new section given there), not an error about dcgan's keys.
    cfg = load_config(SMOKE, ["model.family=r3gan", "model.r3gan.width=64"])
    assert cfg.model.family == "r3gan" and cfg.model.options.width == 64 and "dcgan" not in cfg.to_dict()["model"]
    # Control: the same file keeps its dcgan section when the family is not switched...
    assert load_config(SMOKE).model.options.g_width == 8
    # ...and another family's key written on the command line is still refused.
    with pytest.raises(ConfigError, match="model.dcgan.g_width is an option of model family dcgan"):
        load_config(SMOKE, ["model.family=r3gan", "model.dcgan.g_width=3"])
