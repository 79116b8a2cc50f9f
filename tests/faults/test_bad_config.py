"""Bad config and command-line input (issue #13): every config key given a wrong type or an
out-of-range value, unknown keys, contradictions and bad flags. Each must be refused through the
real CLI with exit 2 and one line on stderr that names the key (or the file or flag), before
anything is written to the run folder.

The tables walk `dtrain.config.config_keys()`, so a new key is covered without editing this file:
its wrong values come from its type hint, and `BAD_VALUES` must list it (a key missing there
fails, named)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_overrides, stripes_dataset

from dtrain import config as config_module
from dtrain import stop_signal
from dtrain.commands.main import main
from dtrain.config import config_keys, load_config

ROOT = REPO
DEEPSPEED = ROOT / "configs" / "deepspeed"

# For each key: values (command-line text) that must be refused, or None with why none is.
# `{tmp}` is the test's temporary folder, `{file}` an existing file.
BAD_VALUES: dict[str, tuple[str, ...] | None] = {
    "data.path": ("{tmp}/no-dataset",),  # refused when the run opens its data
    "data.image_size": ("8",),
    "data.batch_size": ("1",),
    "data.num_workers": ("-1",),
    "data.shuffle_buffer": ("-1",),
    "data.resampled": None,  # a bool: both values are valid
    "data.samples_per_epoch": ("-1",),
    "data.strict": None,  # a bool
    "data.train_labels": ("noisy",),
    "model.backbone": ("resnet19", "not a model"),
    "model.pretrained": ("{tmp}/no-weights.pth", "{file}"),  # true needs the hub
    "model.stem": ("big",),
    "model.projection_hidden": ("0",),
    "model.projection_dim": ("0",),
    "model.attention_hidden": ("0",),
    "model.attention_inputs": ("label",),
    "model.sync_batchnorm": None,  # a bool (true on CPU ranks: refused by the engine)
    "method.name": ("mixupp",),
    "method.group_size": ("1", "33"),
    "method.temperature": ("0", "-0.5"),
    "method.mixup_alpha": ("-1",),
    "method.lambda_iam": ("-0.5",),
    "method.lambda_con": ("-0.5",),
    "method.mixup_space": ("pixel",),
    "method.mixup_backend": ("cuda",),
    "method.warmup_epochs": ("-1",),
    "method.gce_q": ("0", "1.5"),
    "method.sce_alpha": ("-1",),
    "method.sce_beta": ("-1",),
    "method.coteaching_forget_rate": ("1", "-0.1"),
    "method.coteaching_ramp_epochs": ("-1",),
    "method.score_epochs": ("0",),
    "method.elr_lambda": ("-1",),
    "method.elr_beta": ("-0.1", "1"),
    "method.elr_refine_from": ("-1",),
    "method.elr_rampup_epochs": ("-1",),
    "method.consistency_lambda": ("-1",),
    "method.consistency_threshold": ("0", "1.5"),
    "method.consistency_rampup_epochs": ("-1",),
    "method.dividemix_lambda_u": ("-1",),
    "method.dividemix_rampup_epochs": ("0",),
    "method.dividemix_threshold": ("-0.1", "1.5"),
    "method.dividemix_sharpen": ("0",),
    "method.dividemix_alpha": ("-1",),
    "method.dividemix_divide": ("per_sample",),
    "optim.name": ("adam",),
    "optim.lr": ("0", "-0.1"),
    "optim.momentum": ("0", "1"),
    "optim.weight_decay": ("-1e-4",),
    "optim.warmup_epochs": ("-1",),
    "optim.grad_clip": ("-1",),
    "train.epochs": ("0",),
    "train.seed": ("-1", str(2**31)),
    "train.run_dir": ("{file}",),
    "train.precision": ("fp16",),
    "train.grad_accum_steps": ("0",),
    "train.log_every": ("0",),
    "train.progress": None,  # a bool
    "train.max_nonfinite_steps": ("0",),
    "train.stop_after_steps": ("-1",),
    "train.checkpoint_every_steps": ("-1",),
    "train.checkpoint_every_minutes": ("-1",),
    "train.dist_timeout_s": ("0",),
    "train.deepspeed": ("{tmp}/zero9.json",),
    "train.select": ("best_val",),
    "train.select_window": ("0",),
    "train.ema_epochs": ("-0.1",),
    "train.refine_rounds": ("-1", "11"),
    "train.refine_folds": ("-1", "1", "11"),
    "train.refine_init": ("hot",),
    "train.compile": ("indcutor",),
    "train.channels_last": None,  # a bool
    "train.trackers": ("tensorboard,mlfow", "[]x"),
}


# (command-line words, YAML values) not of each scalar type
NOT_OF_TYPE: dict[type, tuple[list[str], list[typing.Any]]] = {
    int: (["ten", "2.5", "true"], ["ten", 2.5, True, [1, 2]]),
    float: (["fast", "true", "nan", "1e999"], ["fast", True, float("nan"), float("inf"), [1.0]]),
    bool: (["maybe", "2"], ["maybe", 2, [True]]),
}


def wrong_values(kind: typing.Any) -> list[tuple[str, typing.Any]]:
    """(where, value) pairs of the wrong type for a key of type `kind`: `override` values are
    command-line text, `yaml` values go into a --config file."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if str in options:  # `bool | str`: any text or bool is one of them
            return [("yaml", [1, 2]), ("yaml", {"a": 1})]
        (option,) = options
        return [("override", "abc"), *wrong_values(option)]
    if origin is list:  # each item of the item type; one bad item refuses the list
        (item,) = typing.get_args(kind)
        items = wrong_values(item)
        return [("yaml", {"a": 1}), *((w, v if w == "override" else [v]) for w, v in items)]
    if origin is typing.Literal:
        first = typing.get_args(kind)[0]
        return [("override", "not-a-choice"), ("yaml", "not-a-choice"), ("yaml", [first])]
    if kind is str:  # any command-line text is a string
        return [("yaml", [1, 2]), ("yaml", {"a": 1}), ("yaml", True)]
    if kind not in NOT_OF_TYPE:
        pytest.fail(f"no wrong values for type {kind!r}: add them to NOT_OF_TYPE")
    words, values = NOT_OF_TYPE[kind]
    return [*(("override", w) for w in words), *(("yaml", v) for v in values)]


def key_types() -> dict[str, typing.Any]:
    hints = typing.get_type_hints(config_module.Config)
    return {
        key: typing.get_type_hints(hints[key.split(".")[0]])[key.split(".")[1]]
        for key in config_keys()
    }


WRONG_TYPES = [
    pytest.param(key, where, value, id=f"{key}-{where}-{value!r}")
    for key, kind in key_types().items()
    for where, value in wrong_values(kind)
]
MISSING = "missing from BAD_VALUES"


def bad_values(key: str) -> tuple[str, ...]:
    return (BAD_VALUES[key] or ()) if key in BAD_VALUES else (MISSING,)


OUT_OF_RANGE = [
    pytest.param(key, value, id=f"{key}={value}")
    for key in config_keys()
    for value in bad_values(key)
]


@pytest.fixture
def cli(capsys, tmp_path, monkeypatch):
    """`dtrain ARGV` in this process, in an empty working folder: returns (exit code, stderr).
    The stop-signal handlers that `main` installs are put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in stop_signal.STOP_SIGNALS}
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            main(list(argv))
        except SystemExit as exit:
            code = exit.code
        else:
            code = 0
        return code, capsys.readouterr().err

    yield run
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    assert not any((tmp_path / "cwd").iterdir()), "something was written to the working folder"


def assert_refused(code: int, err: str, *names: str) -> str:
    """Exit 2 and one line, with no traceback, that names each of `names`."""
    lines = err.splitlines()
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].strip(), f"not one line: {err!r}"
    line = lines[0]
    assert line.startswith(("dtrain train: error: ", "dtrain: error: ", "dtrain eval: error: "))
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def guards(tmp_path: Path, key: str) -> list[str]:
    """The run folder in the test's folder, and a dataset that does not exist: a bad value, were
    it accepted, would stop at the data (naming data.path, not the key under test)."""
    values = {"train.run_dir": tmp_path / "run", "data.path": tmp_path / "no-dataset"}
    return [f"{k}={v}" for k, v in values.items() if k != key]


@pytest.mark.parametrize("key, where, value", WRONG_TYPES)
def test_a_wrong_type_is_refused(cli, tmp_path, key, where, value):
    section, name = key.split(".")
    if where == "override":
        argv = ["train", *guards(tmp_path, key), f"{key}={value}"]
    else:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({section: {name: value}}))
        argv = ["train", "--config", str(path), *guards(tmp_path, key)]
    assert_refused(*cli(*argv), key)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_an_out_of_range_value_is_refused(cli, tmp_path, key, value):
    if value == MISSING:
        pytest.fail(f"{key} is missing from BAD_VALUES: add values it must refuse, or None (why)")
    value = value.format(tmp=tmp_path, file=Path(__file__))
    assert_refused(*cli("train", *guards(tmp_path, key), f"{key}={value}"), key)
    assert not (tmp_path / "run").exists()


def test_the_bad_value_table_names_only_real_keys():
    assert set(BAD_VALUES) <= set(config_keys())


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("optim.lrr", "optim.lr"),
        ("method.group_szie", "method.group_size"),
        ("lr", "optim.lr"),  # a bare leaf
        ("optimm.lr", "optim.lr"),  # a misspelt section
        ("trian.epochs", "train.epochs"),
        ("optim.lr.x", "optim.lr"),
    ],
)
def test_an_unknown_key_is_refused_with_the_nearest(cli, tmp_path, key, suggestion):
    line = assert_refused(*cli("train", *guards(tmp_path, ""), f"{key}=1"), key)
    assert f"did you mean {suggestion}?" in line


def test_an_unknown_key_in_a_config_file_is_refused(cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  nmae: gce\n")
    line = assert_refused(*cli("train", "--config", str(path), *guards(tmp_path, "")))
    assert "method.nmae" in line and "did you mean method.name?" in line
    path.write_text("optimiser:\n  lr: 0.1\n")
    assert_refused(*cli("train", "--config", str(path), *guards(tmp_path, "")), "optimiser")


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_a_section_given_a_value_is_refused(cli, tmp_path, where):
    argv = ["train", *guards(tmp_path, "")]
    if where == "override":
        argv.append("optim=0.1")
    else:
        (tmp_path / "c.yaml").write_text("optim: 0.1\n")
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert_refused(*cli(*argv), "optim", "section")


@pytest.mark.parametrize(
    "overrides, names",
    [
        (
            ["method.name=iam", "data.batch_size=12", "method.group_size=8"],
            ["method.group_size", "data.batch_size"],
        ),
        (["method.name=afm", "data.batch_size=7"], ["data.batch_size", "afm"]),
        (["data.resampled=true"], ["data.samples_per_epoch", "resampled"]),
    ],
)
def test_contradicting_keys_are_refused(cli, tmp_path, overrides, names):
    assert_refused(*cli("train", *guards(tmp_path, ""), *overrides), *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "deepspeed, override, names",
    [
        ({"gradient_clipping": 1.0}, "optim.grad_clip=5", ["gradient_clipping", "optim.grad_clip"]),
        ({"train_micro_batch_size_per_gpu": 4}, "data.batch_size=8", ["data.batch_size"]),
        ({"bf16": {"enabled": True}}, "train.precision=fp32", ["bf16", "train.precision"]),
        ({"optimizer": {"type": "AdamW"}}, "optim.name=sgd", ["AdamW", "optim.name"]),
        ({"gradient_accumulation_steps": 2.5}, "", ["gradient_accumulation_steps"]),
        ({"fp16": {"enabled": True}}, "", ["fp16"]),
        ({"zero_optimization": 3}, "", ["zero_optimization"]),
        ({"zero_optimization": {"stage": 4}}, "", ["zero_optimization.stage"]),
        ("[not json", "", ["ds.json"]),
    ],
)
def test_a_deepspeed_file_that_contradicts_the_config_is_refused(
    cli, tmp_path, deepspeed, override, names
):
    """Refused before DeepSpeed is imported or a process group exists
    (dtrain.train.deepspeed_config)."""
    path = tmp_path / "ds.json"
    path.write_text(deepspeed if isinstance(deepspeed, str) else json.dumps(deepspeed))
    overrides = [f"train.deepspeed={path}", "model.backbone=test_resnet", override]
    assert_refused(*cli("train", *guards(tmp_path, ""), *filter(None, overrides)), *names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, names",
    [
        (["train", "--bogus"], ["--bogus"]),
        (["train", "--resume", "maybe"], ["--resume", "maybe"]),
        (["train", "--resume=maybe"], ["--resume", "maybe"]),
        (["train", "fast"], ["'fast'", "section.key=value"]),
        (["train", "--config"], ["--config"]),
        (["train", "--config", "{tmp}/missing.yaml"], ["missing.yaml"]),
        (["train", "--config", "{tmp}"], ["{tmp}", "cannot be read"]),
        (["trian"], ["trian"]),
        ([], ["command"]),
        (["eval"], ["run_dir"]),
        (["eval", "{tmp}/run", "--split", "dev"], ["--split", "dev"]),
    ],
)
def test_a_bad_flag_is_refused_in_one_line(cli, tmp_path, argv, names):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[:1] == ["train"]:  # the flag under test last: `--config` must find no value
        argv[1:1] = guards(tmp_path, "")
    assert_refused(*cli(*argv), *(n.format(tmp=tmp_path) for n in names))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, names",
    [
        ("data: [1\n", ["c.yaml", "valid YAML", "line 2"]),
        ("- data\n- model\n", ["c.yaml", "mapping"]),
        ("data:\n  batch_size: 8\n   image_size: 32\n", ["c.yaml", "valid YAML", "line 3"]),
    ],
)
def test_a_broken_config_file_is_refused_in_one_line(cli, tmp_path, text, names):
    (tmp_path / "c.yaml").write_text(text)
    code, err = cli("train", "--config", str(tmp_path / "c.yaml"), *guards(tmp_path, ""))
    assert_refused(code, err, *names)


def test_a_commented_out_section_is_no_error(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  # batch_size: 8\noptim:\n  lr: 1e-3\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; dtrain as a number


def test_help_lists_every_method_rule_and_key(capsys):
    """`dtrain train --help` is where a user finds the methods, the rules for best.pt and the
    keys that choose them: every one the registries hold, each beside its own description."""
    from dtrain.methods.registry import METHODS
    from dtrain.train.selection import RULES

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: dtrain train [-h] [--config CONFIG] [--resume [{yes,auto}]]")
    entries = {
        **{n: m.summary for n, m in METHODS.items()},
        **{n: r.describe for n, r in RULES.items()},
    }
    for name, summary in entries.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(summary)}$", text, re.M), name
    for section in (
        "methods (method.name=...",
        "best.pt holds (train.select=...",
        "(train.refine_rounds=N)",
    ):
        assert section in text
    for option in ("--config CONFIG", "--resume [{yes,auto}]", "key=value"):
        assert re.search(rf"^  {re.escape(option)}", text, re.M), option


# -- through a real process: the exit code and stderr a shell sees ------------------------------


@pytest.mark.parametrize(
    "argv, name",
    [
        (["train", "train.epochs=ten"], "train.epochs"),
        (["train", "--resume", "maybe"], "--resume"),
    ],
)
def test_a_real_process_exits_2_with_one_line(tmp_path, argv, name):
    result = subprocess.run(
        [sys.executable, "-m", "dtrain", argv[0], *guards(tmp_path, ""), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_refused(result.returncode, result.stderr, name)
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- against an existing run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run, stopped with its checkpoint after one step: the dataset and the run folder."""
    from dtrain.train import train

    root = tmp_path_factory.mktemp("bad_config")
    data = stripes_dataset(root, 12, shard_size=8)
    run = root / "run"
    train(load_config(None, run_overrides(data, run, "train.stop_after_steps=1")))
    assert (run / "last.pt").is_file()
    return data, run


def run_overrides(data: Path, run: Path, *extra: str) -> list[str]:
    return small_overrides(data, run, 8, "train.epochs=1", *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--resume", "method.name=ce"], ["last.pt", "different config"]),
        (["--resume", "data.image_size=48"], ["last.pt", "different config"]),
        ([], ["already holds a run", "--resume"]),
    ],
)
def test_a_run_folder_is_left_untouched(cli, stopped_run, argv, names):
    """Resuming with a changed method, or starting over a run: refused, not a byte changed."""
    data, run = stopped_run
    before = snapshot(run)
    flags = [a for a in argv if a.startswith("--")]
    overrides = [a for a in argv if not a.startswith("--")]
    assert_refused(*cli("train", *flags, *run_overrides(data, run, *overrides)), *names)
    assert snapshot(run) == before


@pytest.mark.parametrize("exists", [True, False])
def test_resume_of_a_folder_without_a_run_is_refused(cli, stopped_run, tmp_path, exists):
    data, _ = stopped_run
    run = tmp_path / "run"
    if exists:
        run.mkdir()
    assert_refused(*cli("train", "--resume", *run_overrides(data, run)), "--resume", str(run))
    assert run.exists() == exists and (not exists or not any(run.iterdir()))


def test_resume_of_a_run_killed_before_its_first_checkpoint_checks_its_config(
    cli, stopped_run, tmp_path
):
    """Only config.yaml (killed before the first save): --resume starts it over, but only with
    the config it was started with."""
    data, stopped = stopped_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((stopped / "config.yaml").read_bytes())
    before = snapshot(run)
    argv = ["train", "--resume", *run_overrides(data, run, "method.name=ce")]
    assert_refused(*cli(*argv), "config.yaml", "different config")
    assert snapshot(run) == before


@pytest.mark.multiproc
def test_deepspeed_zero3_without_a_launcher_runs_in_one_process(stopped_run, tmp_path):
    """No torchrun, srun or deepspeed launcher: a one-process group, as a user on one GPU
    expects (ZeRO-3 offload needs no second GPU), not DeepSpeed's search for MPI."""
    data, _ = stopped_run
    run = tmp_path / "run"
    overrides = run_overrides(
        data,
        run,
        "method.name=ce",
        "train.stop_after_steps=1",
        f"train.deepspeed={DEEPSPEED}/zero3.json",
    )
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    result = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es)" in result.stdout and "DeepSpeedEngine" in result.stdout
    assert (run / "last.pt").is_file()
