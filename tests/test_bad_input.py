"""Bad input through the CLI: a non-zero exit, exactly one ``error:`` line on stderr naming the file
(and key) and the reason, no traceback, and no output (nor temporary file) left behind.

Every case runs in-process through ``prolora_core.cli.main``; a representative subset also runs as a
real ``python -m prolora_core`` subprocess. The LoRA-content cases are also checked one level down,
on :func:`prolora_core.read_lora`. Last come the mixed cases that still transfer (exit 0) and warn.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures_files import (
    MODULES,
    Bases,
    lora_tensors,
    make_bases,
    make_updates,
    read_output,
    read_report,
    run_cli,
    run_main,
    write_base,
    write_lora,
)
from prolora_core import ProLoRAError, read_lora

Q = "blocks.0.attn.to_q"  # linear 24×40
CONV = "blocks.1.conv"  # conv 3×3, 12×6×3×3
ANY_KEY = "<any>"


@dataclass
class Ctx:
    """A good base pair and LoRA under ``in/``, an empty ``out/`` and the default arguments."""

    root: Path
    bases: Bases

    @property
    def inp(self) -> Path:
        return self.root / "in"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def lora(self) -> Path:
        return self.inp / "lora.safetensors"

    @property
    def out(self) -> Path:
        return self.out_dir / "result.safetensors"

    def transfer(self, *, lora: Path | None = None, source: Path | None = None, target: Path | None = None, out: Path | None = None,
                 extra: tuple[str | Path, ...] = ()) -> list[str | Path]:
        return ["transfer", "--source-base", source or self.bases.source, "--target-base", target or self.bases.target,
                "--lora", lora or self.lora, "--out", out or self.out, "--no-cache", "--device", "cpu", *extra]

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.inp / name
        save_file(tensors, str(path))
        return path

    def bad_lora(self, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        """The good LoRA's tensors, edited, saved as ``bad.safetensors``."""
        tensors = lora_tensors(make_updates())
        edit(tensors)
        return self.write("bad.safetensors", tensors)


@dataclass(frozen=True)
class Expect:
    """What the error line must hold: the file (path or name), the key, a regex for the reason."""

    file: Path | str | None
    key: str | None
    reason: str
    rc: int = 2


Build = Callable[[Ctx], tuple[list[str | Path], Expect]]


def _tensors_case(edit: Callable[[dict[str, torch.Tensor]], None], key: str | None, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.bad_lora(edit)
        return ctx.transfer(lora=path), Expect(path, key, reason)

    return build


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = value

    return edit


def _nan(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        x = t[key].clone()
        x.view(-1)[3] = value
        t[key] = x

    return edit


def _only(tensors: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t.clear()
        t.update(tensors)

    return edit


UP, DOWN, ALPHA = f"{Q}.lora_up.weight", f"{Q}.lora_down.weight", f"{Q}.alpha"
CUP, CDOWN = f"{CONV}.lora_up.weight", f"{CONV}.lora_down.weight"

#: (id, edit of the good LoRA's tensors, key named, reason regex): problems inside a LoRA file
LORA_CONTENT: list[tuple[str, Callable[[dict[str, torch.Tensor]], None], str | None, str]] = [
    ("nan-in-lora", _nan(UP, float("nan")), UP, "contains NaN values"),
    ("inf-in-lora", _nan(DOWN, float("-inf")), DOWN, "contains Inf values"),
    ("ranks-disagree", _set(UP, torch.zeros(24, 5)), UP, r"up and down ranks disagree.*rank 5.*rank 3"),
    ("rank-0", _only({UP: torch.zeros(24, 0), DOWN: torch.zeros(0, 40)}), DOWN, "has rank 0"),
    ("nan-in-fp8-lora", _set(UP, torch.full((24, 3), float("nan")).to(torch.float8_e4m3fn)), UP, "contains NaN values"),
    ("integer-tensors", _set(UP, torch.ones(24, 3, dtype=torch.int32)), UP, "integer dtype int32.*floating point"),
    ("alpha-nan", _set(ALPHA, torch.tensor(float("nan"))), ALPHA, "alpha must be a finite positive number, got nan"),
    ("alpha-inf", _set(ALPHA, torch.tensor(float("inf"))), ALPHA, "alpha must be a finite positive number, got inf"),
    ("alpha-zero", _set(ALPHA, torch.tensor(0.0)), ALPHA, "alpha must be a finite positive number, got 0"),
    ("alpha-negative", _set(ALPHA, torch.tensor(-4.0)), ALPHA, "alpha must be a finite positive number, got -4"),
    ("alpha-not-scalar", _set(ALPHA, torch.ones(3)), ALPHA, "alpha must be a scalar"),
    ("factor-3d", _set(UP, torch.zeros(24, 3, 1)), UP, "must be 2-D .linear. or 4-D .conv."),
    ("up-without-down", _only({UP: torch.zeros(24, 3)}), UP, "has an up factor but no down factor"),
    ("only-unknown-keys", _only({"foo.bar": torch.zeros(3), "text_projection": torch.zeros(4, 4)}), None, "no LoRA module found.*foo.bar"),
    ("only-base-weights", _only({f"{Q}.weight": torch.zeros(24, 40)}), None, "no LoRA module found"),
    ("empty-tensor-dict", _only({}), None, "holds no tensors"),
    # LoCon Tucker, LoHa, LoKr, DoRA and diff modules are read (tests/test_formats.py); malformed ones are refused.
    ("lora-mid-not-square", _set(f"{Q}.lora_mid.weight", torch.zeros(2, 2)), f"{Q}.lora_mid.weight", r"a Tucker core must be \[r, r, kh, kw\]"),
    ("lora-mid-with-peft-factors", _only({f"{Q}.lora_B.weight": torch.zeros(24, 2), f"{Q}.lora_A.weight": torch.zeros(2, 40),
                                         f"{Q}.lora_mid.weight": torch.zeros(2, 2, 3, 3)}), f"{Q}.lora_mid.weight", "needs lora_up/lora_down factors"),
    ("loha-incomplete", _only({f"{Q}.hada_w1_a": torch.zeros(24, 2), f"{Q}.hada_w1_b": torch.zeros(2, 40)}), f"{Q}.hada_w1_a",
     "LoHa module lacks hada_w2_a, hada_w2_b"),
    ("loha-ranks-disagree", _only({f"{Q}.hada_w1_a": torch.zeros(24, 2), f"{Q}.hada_w1_b": torch.zeros(3, 40), f"{Q}.hada_w2_a": torch.zeros(24, 2),
                                   f"{Q}.hada_w2_b": torch.zeros(2, 40)}), f"{Q}.hada_w1_a", r"LoHa factors do not fit together: hada_w1_a \[24, 2\], hada_w1_b \[3, 40\]"),
    ("lokr-without-w2", _only({f"{Q}.lokr_w1": torch.zeros(4, 4)}), f"{Q}.lokr_w1", r"LoKr module lacks w2 \(lokr_w2, or lokr_w2_a and lokr_w2_b\)"),
    ("lora-and-loha-in-one-module", _set(f"{Q}.hada_w1_a", torch.zeros(24, 2)), f"{Q}.hada_w1_a", r"one module mixes adapter types \(LoRA lora_up.weight, LoHa\)"),
    ("lora-and-diff-in-one-module", _set(f"{Q}.diff", torch.zeros(24, 40)), f"{Q}.diff", r"one module mixes adapter types \(LoRA lora_up.weight, diff\)"),
    ("dora-without-update", _only({f"{Q}.dora_scale": torch.ones(24, 1)}), f"{Q}.dora_scale", r"a DoRA magnitude \(dora_scale\) without a weight update"),
    ("nan-in-dora-scale", _set(f"{Q}.dora_scale", torch.full((24, 1), float("nan"))), f"{Q}.dora_scale", "contains NaN values"),
] + [
    (f"unsupported-{part.strip('._')}", _set(f"{Q}{part}", torch.zeros(2, 2)), f"{Q}{part}", f"{what}.* not supported yet")
    for part, what in [
        (".oft_blocks", "OFT"),
        (".boft_blocks", "BOFT"), (".a1.weight", "GLoRA"), (".set_weight", r"weight replacement \(set_weight\)"),
    ]
]


def _case_missing(which: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        missing = ctx.inp / "nope.safetensors"
        return ctx.transfer(**{which: missing}), Expect(missing, None, "file not found")

    return build


def _raw_file(name: str, data: bytes, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.inp / name
        path.write_bytes(data)
        return ctx.transfer(lora=path), Expect(path, None, reason)

    return build


def _damaged(damage: Callable[[bytes], bytes], key: str | None, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.inp / "damaged.safetensors"
        path.write_bytes(damage(ctx.lora.read_bytes()))
        return ctx.transfer(lora=path), Expect(path, key, reason)

    return build


def _corrupt_header(data: bytes) -> bytes:
    return data[:8] + b"#" * 12 + data[20:]


def _header_not_object(data: bytes) -> bytes:
    body = b"[1, 2, 3]".ljust(16)
    return len(body).to_bytes(8, "little") + body + b"\0" * 64


def _torch_save(name: str, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.inp / name
        torch.save(lora_tensors(make_updates()), path)
        return ctx.transfer(lora=path), Expect(path, None, reason)

    return build


class _Payload:
    """A pickle that creates a folder when (and only when) it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _evil_pickle(name: str, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.inp / name
        path.write_bytes(pickle.dumps(_Payload(ctx.root / "UNPICKLED"), protocol=4))
        return ctx.transfer(lora=path), Expect(path, None, reason)

    return build


def _folder_as(which: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        folder = ctx.inp / "a_folder.safetensors"
        folder.mkdir()
        if which == "lora":
            return ctx.transfer(lora=folder), Expect(folder, None, "folder holds no .safetensors LoRA")
        return ctx.transfer(**{which: folder}), Expect(folder, None, "is a folder, expected a .safetensors file")

    return build


def _lora_on(module: str, up: torch.Tensor, down: torch.Tensor, key_part: str, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.write("bad.safetensors", {f"{module}.lora_up.weight": up, f"{module}.lora_down.weight": down})
        return ctx.transfer(lora=path), Expect(path, f"{module}.{key_part}.weight", reason)

    return build


def _bad_base(which: str, value: float | None, dtype: torch.dtype | None, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        weights = dict(ctx.bases.ws if which == "source" else ctx.bases.wt)
        w = weights[Q].copy()
        if value is not None:
            w[5, 7] = value
        weights[Q] = w
        path = write_base(ctx.inp / f"bad_{which}.safetensors", weights)
        if dtype is not None:
            tensors = {f"{m}.weight": torch.from_numpy(x) for m, x in weights.items()}
            tensors[f"{Q}.weight"] = tensors[f"{Q}.weight"].to(dtype)
            save_file(tensors, str(path))
        return ctx.transfer(**{which: path}), Expect(path, f"{Q}.weight", reason)

    return build


def _fp8_base(scale: torch.Tensor, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        tensors = {f"{m}.weight": torch.from_numpy(w) for m, w in ctx.bases.wt.items()}
        tensors[f"{Q}.weight"] = tensors[f"{Q}.weight"].to(torch.float8_e4m3fn)
        tensors[f"{Q}.scale_weight"] = scale
        path = ctx.inp / "fp8_target.safetensors"
        save_file(tensors, str(path))
        return ctx.transfer(target=path), Expect(path, f"{Q}.scale_weight", reason)

    return build


def _gguf_base(name: str, reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        path = ctx.inp / name
        # version 3, five tensors announced, no key-values, then the file ends: a damaged GGUF
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + bytes(8))
        return ctx.transfer(source=path), Expect(path, None, reason)

    return build


def _base_without_modules(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    other = write_base(ctx.inp / "other.safetensors", {"encoder.layers.0.fc": np.ones((8, 8), np.float32)})
    return ctx.transfer(source=other), Expect(ctx.lora, None, r"none of the LoRA's 4 modules has a weight in the source base other\.safetensors")


def _nothing_transferable(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    unrelated = make_bases(ctx.root / "unrelated", unrelated=MODULES)
    return (ctx.transfer(target=unrelated.target, extra=("--threshold", "1.0")),
            Expect(ctx.lora, None, "no module could be transferred to target.safetensors", rc=1))


def _target_without_modules(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    other = write_base(ctx.inp / "other.safetensors", {"encoder.layers.0.fc": np.ones((8, 8), np.float32)})
    return ctx.transfer(target=other), Expect(ctx.lora, None, "no module could be transferred to other.safetensors", rc=1)


def _args(extra: tuple[str, ...], reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        return ctx.transfer(extra=extra), Expect(None, None, reason)

    return build


def _out_case(where: Callable[[Ctx], Path], reason: str) -> Build:
    def build(ctx: Ctx) -> tuple[list[str | Path], Expect]:
        out = where(ctx)
        return ctx.transfer(out=out), Expect(out, None, reason)

    return build


def _out_is_folder(ctx: Ctx) -> Path:
    (ctx.out_dir / "sub").mkdir()
    return ctx.out_dir / "sub"


def _several_without_out_dir(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    second = write_lora(ctx.inp / "second.safetensors", make_updates(seed=2))
    return [*ctx.transfer(), "--lora", second], Expect(None, None, "several LoRAs need --out-dir")


def _out_dir_case(ctx: Ctx, loras: list[Path], out_dir: Path) -> list[str | Path]:
    argv: list[str | Path] = ["transfer", "--source-base", ctx.bases.source, "--target-base", ctx.bases.target, "--no-cache", "--out-dir", out_dir]
    for lora in loras:
        argv += ["--lora", lora]
    return argv


def _missing_out_dir(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    missing = ctx.out_dir / "missing"
    return _out_dir_case(ctx, [ctx.lora], missing), Expect(missing, None, "output folder does not exist")


def _a_file(ctx: Ctx) -> Path:
    (ctx.out_dir / "plain").write_text("a file where a folder is meant")
    return ctx.out_dir / "plain"


def _out_dir_is_a_file(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    plain = _a_file(ctx)
    return _out_dir_case(ctx, [ctx.lora], plain), Expect(plain, None, "--out-dir is a file, not a folder")


def _same_output_name(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    twin = write_lora(ctx.inp / "twin" / "lora.safetensors", make_updates(seed=2))
    return _out_dir_case(ctx, [ctx.lora, twin], ctx.out_dir), Expect(twin, None, "two LoRAs would be written to the same output")


def _report_is_out(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    return ctx.transfer(extra=("--report", str(ctx.out))), Expect(ctx.out, None, "the report would overwrite the output LoRA")


def _strict(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    updates = make_updates()
    updates["blocks.9.attn.to_q"] = updates[Q]
    path = write_lora(ctx.inp / "extra.safetensors", updates)
    return ctx.transfer(lora=path, extra=("--strict",)), Expect(path, None, r"1 LoRA modules have no weight in source\.safetensors: 'blocks\.9\.attn\.to_q' \(--strict\)")


def _inspect_text(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    path = ctx.inp / "notes.txt"
    path.write_text("these are my prompt notes, not a model\n" * 4)
    return ["inspect", path], Expect(path, None, "not a safetensors file")


def _similarity_missing(ctx: Ctx) -> tuple[list[str | Path], Expect]:
    missing = ctx.inp / "nope.safetensors"
    return ["similarity", "--source-base", ctx.bases.source, "--target-base", missing, "--no-cache"], Expect(missing, None, "file not found")


CASES: list[tuple[str, Build]] = [
    ("missing-lora", _case_missing("lora")),
    ("missing-source-base", _case_missing("source")),
    ("missing-target-base", _case_missing("target")),
    ("folder-as-source-base", _folder_as("source")),
    ("empty-lora-folder", _folder_as("lora")),
    ("empty-file", _raw_file("empty.safetensors", b"", "file is empty")),
    ("text-file", _raw_file("readme.safetensors", b"this is a text file, not tensors\n" * 3, r"not a safetensors file \(header length")),
    ("tiny-file", _raw_file("tiny.safetensors", b"abc", "shorter than its 8-byte header")),
    ("truncated", _damaged(lambda d: d[: len(d) * 2 // 3], ANY_KEY, "file is truncated")),
    ("corrupt-header", _damaged(_corrupt_header, None, "corrupt safetensors header")),
    ("header-not-an-object", _damaged(_header_not_object, None, "corrupt safetensors header")),
    ("pickle-pt", _torch_save("lora.pt", "'.pt' files are pickles and are never unpickled")),
    ("pickle-ckpt", _evil_pickle("lora.ckpt", "'.ckpt' files are pickles and are never unpickled")),
    ("torch-zip-named-safetensors", _torch_save("zip.safetensors", "looks like a pickle/zip checkpoint")),
    ("pickle-named-safetensors", _evil_pickle("evil.safetensors", "looks like a pickle/zip checkpoint")),
    *[(case_id, _tensors_case(edit, key, reason)) for case_id, edit, key, reason in LORA_CONTENT],
    ("shape-of-another-base", _lora_on(Q, torch.zeros(32, 3), torch.zeros(3, 40), "lora_up", r"LoRA update is 32×40 .* looks like a LoRA for another base model")),
    ("nan-in-source-base", _bad_base("source", float("nan"), None, "base weight contains NaN or Inf values")),
    ("inf-in-target-base", _bad_base("target", float("inf"), None, "base weight contains NaN or Inf values")),
    ("integer-base-weight", _bad_base("source", None, torch.int8, "integer bases are not supported")),
    ("fp8-base-with-a-scale-per-row", _fp8_base(torch.ones(24), r"fp8 scale of shape \[24\] .* only one scalar scale per weight is supported")),
    ("damaged-gguf-base", _gguf_base("base.gguf", r"not a readable GGUF file")),
    ("gguf-lora", _raw_file("lora.gguf", b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF files cannot be read here: only safetensors are")),
    ("gguf-base-named-safetensors", _gguf_base("base.safetensors", "is a GGUF file, which cannot be read here")),
    ("dora-scale-of-another-shape", _tensors_case(_set(f"{Q}.dora_scale", torch.ones(5, 1)), f"{Q}.dora_scale",
                                                  r"DoRA magnitude of shape \[5, 1\] fits neither the rows nor the input channels of the weight \[24, 40\]")),
    ("diff-b-of-another-shape", _tensors_case(_set(f"{Q}.diff_b", torch.zeros(7)), f"{Q}.diff_b", r"has shape \[7\] .* \(needs \[24\]\)")),
    ("diff-of-another-shape", _tensors_case(_only({f"{Q}.diff": torch.zeros(40, 24)}), f"{Q}.diff", r"LoRA update is 40×24 .* another base model")),
    ("base-without-lora-modules", _base_without_modules),
    ("nothing-transferable", _nothing_transferable),
    ("target-without-lora-modules", _target_without_modules),
    ("subspace-rank-0", _args(("--subspace-rank", "0"), "--subspace-rank must be positive, got 0")),
    ("subspace-rank-negative", _args(("--subspace-rank", "-3"), "--subspace-rank must be positive, got -3")),
    ("threshold-above-1", _args(("--threshold", "1.5"), r"--threshold must lie in \[0, 1\], got 1.5")),
    ("threshold-negative", _args(("--threshold", "-0.1"), r"--threshold must lie in \[0, 1\], got -0.1")),
    ("threshold-nan", _args(("--threshold", "nan"), r"--threshold must lie in \[0, 1\], got nan")),
    ("out-rank-0", _args(("--out-rank", "0"), "output rank must be positive")),
    ("out-in-missing-folder", _out_case(lambda c: c.root / "missing" / "x.safetensors", "output folder does not exist")),
    ("out-in-a-file", _out_case(lambda c: _a_file(c) / "x.safetensors", "output folder plain is a file")),
    ("out-equals-lora", _out_case(lambda c: c.lora, "output path is one of the input files")),
    ("out-equals-source-base", _out_case(lambda c: c.bases.source, "output path is one of the input files")),
    ("out-is-a-folder", _out_case(_out_is_folder, "output path is a folder")),
    ("several-loras-without-out-dir", _several_without_out_dir),
    ("out-dir-missing", _missing_out_dir),
    ("out-dir-is-a-file", _out_dir_is_a_file),
    ("two-loras-same-output-name", _same_output_name),
    ("report-overwrites-output", _report_is_out),
    ("strict-module-without-base-weight", _strict),
    ("inspect-text-file", _inspect_text),
    ("similarity-missing-base", _similarity_missing),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-without-gpu", _args(("--device", "cuda"), "asked for but torch sees no CUDA device")))
CASE_IDS = [c[0] for c in CASES]
SUBPROCESS_IDS = ["missing-lora", "pickle-named-safetensors", "nan-in-lora", "nothing-transferable"]


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Ctx]:
    bases = make_bases(tmp_path / "in")
    c = Ctx(tmp_path, bases)
    write_lora(c.lora, make_updates())
    c.out_dir.mkdir()
    yield c


def snapshot(ctx: Ctx) -> dict[str, tuple[int, int]]:
    """Every file under the run's folder (hidden temporaries included): size and mtime."""
    return {str(p.relative_to(ctx.root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(ctx.root.rglob("*")) if p.is_file()}


def check_error(rc: int, err: str, expect: Expect, ctx: Ctx, before: dict[str, tuple[int, int]]) -> None:
    assert rc == expect.rc, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one error line, got: {err!r}"
    assert all(line.startswith(("error:", "warning:")) for line in lines), f"stray stderr output: {err!r}"
    line = errors[0]
    if expect.file is not None:
        assert str(expect.file) in line, f"the file is not named: {line}"
    if expect.key == ANY_KEY:
        assert re.search(r"key '[^']+'", line), f"no key named: {line}"
    elif expect.key is not None:
        assert f"key '{expect.key}'" in line, f"key {expect.key} not named: {line}"
    assert re.search(expect.reason, line), f"reason {expect.reason!r} not in: {line}"
    assert snapshot(ctx) == before, "no file may be written, changed or left behind"
    assert not (ctx.root / "UNPICKLED").exists(), "a pickle was unpickled"


@pytest.mark.parametrize("build", [c[1] for c in CASES], ids=CASE_IDS)
def test_bad_input_in_process(ctx: Ctx, capsys: pytest.CaptureFixture[str], build: Build) -> None:
    argv, expect = build(ctx)
    before = snapshot(ctx)
    rc, _, err = run_main(argv, capsys)
    check_error(rc, err, expect, ctx, before)


@pytest.mark.parametrize("build", [b for i, b in CASES if i in SUBPROCESS_IDS], ids=[i for i, _ in CASES if i in SUBPROCESS_IDS])
def test_bad_input_subprocess(ctx: Ctx, build: Build) -> None:
    argv, expect = build(ctx)
    before = snapshot(ctx)
    proc = run_cli(argv, cache_dir=ctx.root.parent / f"{ctx.root.name}-cache")
    check_error(proc.returncode, proc.stderr, expect, ctx, before)
    if expect.rc == 1:  # nothing transferable: the summary on stdout says why, nothing else
        assert all(line.startswith(("ProLoRA ", "  ")) or line.endswith(" modules") for line in proc.stdout.splitlines()), proc.stdout
    else:
        assert proc.stdout == ""


@pytest.mark.parametrize("edit,key,reason", [c[1:] for c in LORA_CONTENT], ids=[c[0] for c in LORA_CONTENT])
def test_read_lora_refuses(ctx: Ctx, edit: Callable[[dict[str, torch.Tensor]], None], key: str | None, reason: str) -> None:
    path = ctx.bad_lora(edit)
    with pytest.raises(ProLoRAError, match=reason) as info:
        read_lora(path)
    assert info.value.file == str(path) and info.value.key == key


def test_unreadable_file(capsys: pytest.CaptureFixture[str]) -> None:
    """chmod 000 does not stop root, so as root the run drops its effective uid to ``nobody``."""
    root = Path(tempfile.mkdtemp(prefix="prolora-unreadable-"))
    try:
        root.chmod(0o755)
        c = Ctx(root, make_bases(root / "in"))
        write_lora(c.lora, make_updates())
        c.out_dir.mkdir()
        c.out_dir.chmod(0o777)
        for p in c.inp.iterdir():
            p.chmod(0o644)
        c.lora.chmod(0)
        before = snapshot(c)
        as_root = os.geteuid() == 0
        if as_root:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            rc, _, err = run_main(c.transfer(), capsys)
        finally:
            if as_root:
                os.seteuid(0)
                os.setegid(0)
        check_error(rc, err, Expect(c.lora, None, "(?i)permission denied"), c, before)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_unknown_keys_mixed_in_still_transfer_with_a_warning(ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    extra = {"lora_te_text_model_proj.weird_factor": torch.zeros(3), "some.hypernetwork.scale": torch.ones(1)}
    lora = write_lora(ctx.inp / "mixed.safetensors", make_updates(), extra=extra)
    rc, _, err = run_main(ctx.transfer(lora=lora), capsys)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any(all(k in line for k in extra) and str(lora) in line for line in warnings), err
    assert set(read_output(ctx.out)) == set(MODULES)


@pytest.mark.parametrize("n_missing", [1, 7], ids=["one", "seven"])
def test_modules_without_base_weight_are_warned_and_reported(ctx: Ctx, capsys: pytest.CaptureFixture[str], n_missing: int) -> None:
    updates = make_updates()
    missing = [f"blocks.{9 + i}.attn.to_q" for i in range(n_missing)]
    for name in missing:
        updates[name] = updates[Q]
    lora = write_lora(ctx.inp / "extra.safetensors", updates)
    report_path = ctx.out_dir / "report.json"
    rc, _, err = run_main(ctx.transfer(lora=lora, extra=("--report", report_path)), capsys)
    assert rc == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning:") and "no weight in source.safetensors" in line)
    assert all(name in warning for name in sorted(missing)[:5]), warning
    if n_missing > 5:
        assert f"and {n_missing - 5} more (--report lists them all)" in warning
    assert set(read_output(ctx.out)) == set(MODULES)
    rows = {m["source"]: m for m in read_report(report_path)["modules"]}
    for name in missing:
        row = rows[name]
        assert row["transferred"] is False and row["target"] is None and row["reason"] == "no base weight"
    assert read_report(report_path)["summary"]["loras"][str(lora)]["no_base_weight"] == n_missing
