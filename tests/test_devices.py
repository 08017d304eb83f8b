"""`--device`: the policy without the hardware, and the CLI's answer on this (CPU-only) machine.
No GPU was available where these tests were written: CUDA and MPS are only exercised through the
pure policy function; what a GPU run does is not tested here."""

from __future__ import annotations

import pytest
from e2e_helpers import run_cli

from clipsearch.devices import DeviceError, pick_device


@pytest.mark.parametrize(
    "requested, cuda, mps, expected",
    [
        ("auto", True, True, "cuda"),
        ("auto", False, True, "mps"),
        ("auto", False, False, "cpu"),
        ("cpu", True, True, "cpu"),
        ("cuda", True, False, "cuda"),
        ("mps", False, True, "mps"),
    ],
)
def test_pick_device(requested, cuda, mps, expected):
    assert pick_device(requested, cuda=cuda, mps=mps) == expected


def test_a_named_device_that_is_missing_is_an_error():
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        pick_device("cuda", cuda=False, mps=True)
    with pytest.raises(DeviceError, match="Metal"):
        pick_device("mps", cuda=True, mps=False)
    with pytest.raises(DeviceError, match="unknown device"):
        pick_device("tpu", cuda=True, mps=True)


def test_cli_device_option(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-device message cannot be shown")
    (tmp_path / "p").mkdir()
    from e2e_helpers import make_tiny_model, write_photo

    write_photo(tmp_path / "p" / "a.jpg", 1)
    model = make_tiny_model(tmp_path / "tiny")
    result = run_cli(
        "--db",
        str(tmp_path / "lib.db"),
        "index",
        str(tmp_path / "p"),
        "--model",
        str(model),
        "--device",
        "cuda",
    )
    assert result.returncode == 1 and "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    ok = run_cli(
        "--db",
        str(tmp_path / "lib.db"),
        "index",
        str(tmp_path / "p"),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    for command in (["query", "x", "--device", "cuda"], ["label", "--classes", "a,b", "--device", "cuda"]):
        result = run_cli("--db", str(tmp_path / "lib.db"), *command)
        assert result.returncode == 1 and "no CUDA GPU" in result.stderr, result.stderr
