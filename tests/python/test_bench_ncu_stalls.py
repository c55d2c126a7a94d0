"""bench/ncu_stalls.py: reading Nsight Compute's SASS source page and ranking the stall samples
(a hand-made export in the layout ncu writes: a kernel line, a header line, instruction lines)."""

import gzip
import importlib.util
import pathlib
import sys

import pytest

_TOOL = pathlib.Path(__file__).resolve().parents[2] / "bench" / "ncu_stalls.py"

_HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
           '"stall_barrier","stall_long_sb","stall_short_sb","stall_barrier (Not Issued)"\n')
_CSV = (
    '"Kernel Name","void a_kernel<bf16>(Params)",\n' + _HEADER +
    '"0x10","      LDG.E.128 R4, desc[UR4][R2.64]","2","8","0","0","0","0"\n'
    '"0x20","      PRMT R8, R4, 0x7632, R8","60","8","0","58","0","0"\n'
    '"0x30","      BAR.SYNC.DEFER_BLOCKING 0x0","1","8","0","0","0","0"\n'
    '"0x40","@P0   BRA 0x100","30","8","29","0","0","25"\n'
    '"0x50","      HMMA.16816.F32.BF16 R8, R12, R16, R8","7","4","0","0","7","0"\n'
    '"Kernel Name","void b_kernel(Params)",\n' + _HEADER +
    '"0x10","      EXIT","0","4","0","0","0","0"\n'
)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("bench_ncu_stalls", _TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_reads_every_kernel_and_its_rows(tool, tmp_path, gzipped):
    path = tmp_path / ("sass.csv.gz" if gzipped else "sass.csv")
    path.write_bytes(gzip.compress(_CSV.encode()) if gzipped else _CSV.encode())
    kernels = tool.read_kernels(str(path))
    assert [k.name for k in kernels] == ["void a_kernel<bf16>(Params)", "void b_kernel(Params)"]
    assert [len(k.rows) for k in kernels] == [5, 1]
    # the "(Not Issued)" duplicates are not reasons of their own
    assert kernels[0].reasons == ["stall_barrier", "stall_long_sb", "stall_short_sb"]
    assert kernels[0].total() == 100 and kernels[1].total() == 0


def test_opcode_drops_the_predicate(tool):
    assert tool.opcode("@!P0  LDG.E.128 R4, desc[UR4][R2.64]") == "LDG.E.128"
    assert tool.opcode("HMMA.16816.F32.BF16 R8, R12, R16, R8") == "HMMA.16816.F32.BF16"
    assert tool.opcode("") == "?"


def test_summary_ranks_instructions_reasons_and_regions(tool, tmp_path):
    path = tmp_path / "sass.csv"
    path.write_text(_CSV)
    kernel = tool.read_kernels(str(path))[0]
    text = tool.summary(kernel, top=2, region=2)
    lines = text.splitlines()
    assert "samples 100" in lines[1]
    assert "by reason: long_sb 58.0%, barrier 29.0%, short_sb 7.0%" in text
    assert "by opcode: PRMT 60.0%, BRA 30.0%, HMMA.16816.F32.BF16 7.0%, LDG.E.128 2.0%" in text
    top = lines[lines.index(next(l for l in lines if l.strip().startswith("top 2"))) + 1:][:2]
    assert top[0].split()[:2] == ["1", "60.00%"] and "long_sb:58" in top[0]
    assert top[1].split()[:2] == ["3", "30.00%"] and "barrier:29" in top[1]
    # regions of two instructions: [0, 1] 62%, [2, 3] 31%, [4] 7%
    assert [l.split()[1] for l in lines if l.strip()[:1].isdigit() and "-" in l.split()[0]] == [
        "62.0%", "31.0%", "7.0%"]


def test_kernel_without_samples_and_cli(tool, tmp_path, capsys):
    path = tmp_path / "sass.csv"
    path.write_text(_CSV)
    assert "no samples" in tool.summary(tool.read_kernels(str(path))[1])
    assert tool.main([str(path), "--kernel", "a_kernel", "--top", "1"]) == 0
    assert "PRMT R8, R4" in capsys.readouterr().out
    assert tool.main([str(path), "--kernel", "missing"]) == 1
    assert "no kernel matching" in capsys.readouterr().err
