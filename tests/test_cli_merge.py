"""`fedmerge merge` end to end: success, listing, and every error path leaving no output."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmerge import load_state_dict, read_metadata, save_state_dict
from fedmerge.cli import main
from fedmerge.merging import merge

REPO = Path(__file__).resolve().parents[1]


def state(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=gen).to(dtype),
        "a.bias": torch.randn(4, generator=gen).to(dtype),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.safetensors"
        save_state_dict(state(i), p)
        paths.append(str(p))
    return tmp_path, paths


def run_cli(*args):
    return main(["merge", *map(str, args)])


def test_merge_writes_the_api_result_with_metadata(ckpts, capsys):
    tmp, (base, a, b) = ckpts
    out = tmp / "out.safetensors"
    rc = run_cli("ties", "--base", base, a, b, "-o", out, "--param", "density=0.5",
                 "--weights", "1,2", "--no-progress")  # fmt: skip
    assert rc == 0
    want = merge("ties", state(0), [state(1), state(2)], [1, 2], density=0.5)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert read_metadata(out)["fedmerge.method"] == "ties"
    assert "merged with ties" in capsys.readouterr().out


def test_experts_may_follow_options_and_dirs_shard(ckpts):
    tmp, (base, a, b) = ckpts
    shard_dir = tmp / "sharded"
    save_state_dict(state(1), shard_dir, max_shard_bytes=40)
    assert (shard_dir / "model.safetensors.index.json").exists()
    out = tmp / "outdir"
    rc = run_cli("task_arithmetic", shard_dir, "--base", base, b, "-o", out,
                 "--dtype", "bfloat16", "--max-shard-size", "20B", "-p", "lambda=1")  # fmt: skip
    assert rc == 0 and (out / "model.safetensors.index.json").exists()
    got = load_state_dict(out)
    want = merge("task_arithmetic", state(0), [state(1), state(2)], dtype=torch.bfloat16,
                 **{"lambda": 1.0})  # fmt: skip
    assert got["a.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_list_shows_every_method_and_parameter(capsys):
    assert main(["merge", "--list"]) == 0
    text = capsys.readouterr().out
    for word in ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magmax",
                 "breadcrumbs", "fisher", "density", "gamma", "epsilon", "scope"):  # fmt: skip
        assert word in text


def corrupt(tmp: Path, kind: str) -> Path:
    """An expert checkpoint broken in one way."""
    p = tmp / f"bad_{kind}.safetensors"
    sd = state(5)
    if kind == "missing":
        del sd["a.bias"]
    elif kind == "extra":
        sd["extra.w"] = torch.zeros(2)
    elif kind == "shape":
        sd["a.bias"] = torch.zeros(5)
    elif kind == "dtype":
        sd["a.weight"] = sd["a.weight"].to(torch.float16)
    elif kind == "nan":
        sd["a.weight"][1, 2] = float("nan")
    elif kind == "inf":
        sd["a.bias"][0] = float("inf")
    save_state_dict(sd, p)
    if kind == "truncated":
        p.write_bytes(p.read_bytes()[:-20])
    if kind == "garbage":
        p.write_bytes(b"not a checkpoint at all")
    return p


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "missing key 'a.bias'"),
        ("extra", "unexpected key 'extra.w'"),
        ("shape", "'a.bias' has shape [5], expected [4]"),
        ("dtype", "'a.weight' has dtype torch.float16, expected torch.float32"),
        ("nan", "'a.weight' has non-finite values"),
        ("inf", "'a.bias' has non-finite values"),
        ("truncated", "not a readable safetensors file"),
        ("garbage", "not a readable safetensors file"),
    ],
)
def test_bad_expert_is_named_and_nothing_is_written(ckpts, capsys, kind, message):
    tmp, (base, a, _) = ckpts
    bad = corrupt(tmp, kind)
    before = sorted(os.listdir(tmp))
    assert run_cli("ties", "--base", base, a, bad, "-o", tmp / "out.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and bad.name in err
    assert sorted(os.listdir(tmp)) == before  # no output, no temp files


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown merge method 'nope'"),
        (["ties", "-p", "density=2"], r"'density' must be in (0, 1], got 2.0"),
        (["ties", "-p", "dens=0.1"], "method 'ties' has no parameter 'dens'"),
        (["ties", "-p", "density"], "--param expects key=value"),
        (["dare_ties", "-p", "rescale=l2"], "'rescale' must be one of"),
        (["ties", "--weights", "1,x"], "--weights: expected numbers"),
        (["ties", "--weights", "1,2,3"], "3 weight(s) for 2 expert(s)"),
        (["average", "--weights", "1,-2"], "needs weights >= 0"),
        (["fisher"], "needs one Fisher file per expert"),
        (["ties", "--max-shard-size", "lots"], "--max-shard-size"),
        (["ties", "--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_method_or_option_is_named_and_nothing_is_written(ckpts, capsys, args, message):
    tmp, (base, a, b) = ckpts
    out = tmp / "out.safetensors"
    assert run_cli(args[0], "--base", base, a, b, "-o", out, *args[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and not out.exists()


def test_nan_in_reference_and_output_overwriting_input(ckpts, capsys):
    tmp, (base, a, b) = ckpts
    nan_base = corrupt(tmp, "nan")
    assert run_cli("average", "--base", nan_base, a, b, "-o", tmp / "o.safetensors") == 2
    assert f"{nan_base}: 'a.weight' has non-finite" in capsys.readouterr().err
    assert run_cli("average", "--base", base, a, b, "-o", a) == 2
    assert "output would overwrite an input" in capsys.readouterr().err


def test_missing_arguments(ckpts, capsys):
    tmp, (base, a, _) = ckpts
    assert run_cli("ties", a, "-o", tmp / "x.safetensors") == 2
    assert "--base" in capsys.readouterr().err
    assert run_cli("ties", "--base", base, "-o", tmp / "x.safetensors") == 2
    assert "at least one EXPERT" in capsys.readouterr().err


def test_console_exit_status_and_one_line_error(ckpts):
    tmp, (base, a, _) = ckpts
    proc = subprocess.run(
        [sys.executable, "-m", "fedmerge", "merge", "ties", "--base", base, a,
         str(tmp / "missing.safetensors"), "-o", str(tmp / "o.safetensors")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedmerge merge: error: {tmp / 'missing.safetensors'}: no such file"
    ]


def test_threads_are_chosen_and_recorded(ckpts, capsys):
    """--threads N runs the merge on N torch threads, says so, and records it; the default
    is the physical core count; the caller's thread setting is restored afterwards."""
    from fedmerge.threads import physical_cores

    tmp, (base, a, b) = ckpts
    before = torch.get_num_threads()
    for threads, want in (("1", 1), (None, physical_cores())):
        out = tmp / f"t{threads}.safetensors"
        extra = ["--threads", threads] if threads else []
        assert run_cli("ties", "--base", base, a, b, "-o", out, "--no-progress", *extra) == 0
        assert read_metadata(out)["fedmerge.threads"] == str(want)
        assert f"on {want} thread(s)" in capsys.readouterr().out
        assert torch.get_num_threads() == before
