"""Path-shaped mistakes on the command line and corrupted files: one line on stderr, exit
code 2, never a traceback (an interrupted search, a broken checkpoint: tests/search/test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moecomp.apply import QuantizedLayer
from moecomp.cli.codec import parse_size
from moecomp.codec import encode_model
from moecomp.errors import ConfigError


@pytest.fixture
def mcz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) < 0.4
    layer = QuantizedLayer(
        (30, 40),
        torch.from_numpy(mask),
        torch.from_numpy(rng.integers(0, 4, int(mask.sum()))),
        torch.tensor([-1.0, -0.5, 0.5, 1.0]),
    )
    path = tmp_path / "m.mcz"
    path.write_bytes(
        encode_model(
            {"w": layer},
            {"b": torch.arange(30, dtype=torch.float32)},
            plan={"layers": {"w": {"sparsity": 0.6, "bits": 2}}},
        )
    )
    return path


def test_decode_and_inspect_work_and_say_what_they_checked(cli, mcz, tmp_path):
    code, out, _ = cli("decode", str(mcz), "--out", str(tmp_path / "d.st"))
    assert code == 0 and set(load_file(tmp_path / "d.st")) == {"w", "b"}
    code, out, _ = cli("inspect", str(mcz))
    assert code == 0 and "CRC32 of all 3 streams verified" in " ".join(out.split())
    code, out, _ = cli("inspect", str(mcz), "--header-only")
    assert code == 0 and "NOT verified" in " ".join(out.split())


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["decode", "{missing}", "--out", "{tmp}/x.st"], ["no such file"]),
        (["decode", "{tmp}", "--out", "{tmp}/x.st"], ["is a folder"]),
        (["decode", "{mcz}", "--out", "{tmp}/nowhere/x.st"], ["does not exist"]),
        (["decode", "{mcz}", "--out", "{tmp}"], ["is a folder"]),
        (["decode", "{mcz}", "--out", "{tmp}/x.st", "--max-bytes", "1KiB"], ["max_bytes"]),
        (["decode", "{mcz}", "--out", "{tmp}/x.st", "--max-bytes", "lots"], ["--max-bytes"]),
        (["inspect", "{missing}"], ["no such file"]),
        (["inspect", "{tmp}"], ["is a folder"]),
        (["inspect", "{mcz}", "--max-bytes", "100"], ["max_bytes"]),
        (["train", "{missing}"], ["no such file"]),
        (["search", "{missing}", "--out", "{tmp}/r"], ["no such file"]),
        (["search", "{repo}/problems/digits-mlp.toml", "--out", "{mcz}"], ["not a folder"]),
        (["study", "{missing}"], ["no such file"]),
        (["pick", "{missing}", "--knee"], ["does not exist"]),
        (["pick", "{mcz}", "--knee"], ["is a file"]),
        (["refine", "{missing}", "--solution", "1"], ["no such folder"]),
        (["export", "{missing}", "--solution", "1"], ["does not exist"]),
        (["export", "{tmp}", "--solution", "1", "--out", "{tmp}"], ["is a folder"]),
        (["compare", "{missing}"], ["does not exist"]),
        (["report", "{missing}"], ["does not exist"]),
    ],
)
def test_path_mistakes_are_one_line_errors(cli, one_line_error, tmp_path, repo, mcz, args,
                                           needles):
    fill = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "mcz": str(mcz),
            "repo": str(repo)}
    code, _, err = cli(*[a.format(**fill) for a in args])
    one_line_error(code, err, *needles)


def test_an_unreadable_file_is_a_one_line_error(cli, one_line_error, monkeypatch, mcz, tmp_path):
    # root reads anything whatever its mode, so the refusal is simulated where files are opened
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(mcz))

    monkeypatch.setattr("moecomp.paths.open", refuse, raising=False)
    code, _, err = cli("inspect", str(mcz))
    one_line_error(code, err, "cannot be read", "Permission denied")
    monkeypatch.undo()
    # and a path error no command checked up front still gives one line
    monkeypatch.setattr("moecomp.cli.codec.read_mcz", refuse)
    code, _, err = cli("decode", str(mcz), "--out", str(tmp_path / "x"))
    one_line_error(code, err, str(mcz), "Permission denied")


def test_corrupted_payloads_fail_inspect_and_decode(cli, one_line_error, mcz, tmp_path):
    data = bytearray(mcz.read_bytes())
    data[-3] ^= 0x10  # inside the last stream's payload: the header stays valid
    bad = tmp_path / "bad.mcz"
    bad.write_bytes(bytes(data))
    code, _, err = cli("inspect", str(bad))
    one_line_error(code, err, "CRC mismatch")
    code, _, err = cli("decode", str(bad), "--out", str(tmp_path / "x"))
    one_line_error(code, err, "CRC mismatch")
    assert not (tmp_path / "x").exists()
    code, out, _ = cli("inspect", str(bad), "--header-only")
    assert code == 0 and "NOT verified" in " ".join(out.split())


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5 gib", 3 * 2**29)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1 parsec", "0", "GiB"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ConfigError, match="--max-bytes"):
        parse_size(text)
