"""Benchmark figures are data: bench/results/*.json, rendered into docs/performance.md by scripts/render_bench.py.

No torch, no ray: the renderer and the benches' result writer are plain Python, so these run in well under a second.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "scripts" / "render_bench.py"
REQUIRED = ("bench", "command", "machine", "date", "source", "rows")


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_performance_doc_is_rendered_from_its_data():
    result = _render("--check")
    assert result.returncode == 0, f"{result.stderr}(regenerate with python scripts/render_bench.py)"


def test_every_result_file_has_the_keys_and_rows_a_table_needs():
    paths = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert paths, "bench/results holds no result files"
    for path in paths:
        result = json.loads(path.read_text())
        assert [key for key in REQUIRED if key not in result] == [], path.name
        assert result["bench"].startswith("bench_") and (ROOT / "bench" / f"{result['bench']}.py").is_file(), path.name
        assert result["source"] == "measured" or result["source"].startswith("transcribed from "), path.name
        assert isinstance(result["rows"], list) and result["rows"], f"{path.name}: no rows"
        assert all(isinstance(row, dict) and row for row in result["rows"]), f"{path.name}: an empty row"


DOC = """# Throughput

- **A bench.** What it measures, in prose:

  <!-- bench:bench_x -->
  | an old | table |
  <!-- /bench:bench_x -->

  What its figures mean.
"""

RENDERED_BLOCK = """  <!-- bench:bench_x -->

  | case | tokens/s | vs a | per update | cached |
  |---|---|---|---|---|
  | a | 92.1 | 1.00× |  |  |
  | b\\|c | 101.6 | 1.10× | 0.624, 0.628 | true |

  command: `python bench/bench_x.py --n 2`; machine: a CPU, 2 cores; date: not stated; source: measured

  <!-- /bench:bench_x -->"""


def _synthetic(tmp_path: Path) -> tuple[Path, Path]:
    results, doc = tmp_path / "results", tmp_path / "performance.md"
    results.mkdir()
    (results / "bench_x.json").write_text(json.dumps({
        "bench": "bench_x", "command": "python bench/bench_x.py --n 2", "machine": "a CPU, 2 cores", "date": None,
        "source": "measured",
        "rows": [{"case": "a", "tokens/s": 92.123, "vs a": 1.0},
                 {"case": "b|c", "tokens/s": 101.64, "vs a": 1.1, "per update": [0.6241, 0.628], "cached": True}],
        "formats": {"tokens/s": "{:.1f}", "vs a": "{:.2f}×", "per update": "{:.3f}"}}))
    doc.write_text(DOC)
    return results, doc


def test_rendering_replaces_a_block_with_the_table_of_its_data(tmp_path):
    results, doc = _synthetic(tmp_path)
    args = ("--doc", str(doc), "--results", str(results))
    stale = _render("--check", *args)
    assert stale.returncode == 1 and "bench_x" in stale.stderr
    assert doc.read_text() == DOC  # --check never writes

    assert _render(*args).returncode == 0
    head, tail = DOC.split("  <!-- bench:bench_x -->\n  | an old | table |\n  <!-- /bench:bench_x -->")
    assert doc.read_text() == head + RENDERED_BLOCK + tail  # the prose around the block untouched
    assert _render("--check", *args).returncode == 0
    assert _render(*args).stdout == ""  # rendering again changes nothing

    (results / "bench_x.json").write_text((results / "bench_x.json").read_text().replace("92.123", "90.0"))
    changed = _render("--check", *args)
    assert changed.returncode == 1 and "bench_x" in changed.stderr


def test_a_block_without_data_and_data_without_a_block_are_errors(tmp_path):
    results, doc = _synthetic(tmp_path)
    args = ("--doc", str(doc), "--results", str(results))
    (results / "bench_y.json").write_text((results / "bench_x.json").read_text())
    result = _render(*args)
    assert result.returncode == 1 and "bench_y" in result.stderr
    (results / "bench_y.json").unlink()
    doc.write_text(DOC + "\n  <!-- bench:bench_z -->\n  <!-- /bench:bench_z -->\n")
    result = _render(*args)
    assert result.returncode == 1 and "bench_z" in result.stderr
    (results / "bench_x.json").write_text(json.dumps({"bench": "bench_x", "rows": []}))
    result = _render(*args)
    assert result.returncode == 1 and "bench_x.json: missing key(s) command, machine, date, source" in result.stderr


def test_what_a_bench_writes_renders(tmp_path, monkeypatch):
    """bench/result_file.py (each bench's --json) writes what the renderer reads, atomically."""
    spec = importlib.util.spec_from_file_location("result_file", ROOT / "bench" / "result_file.py")
    result_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(result_file)
    results, doc = _synthetic(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--json", "out.json"])
    result_file.write_result(str(results / "bench_x.json"), "bench_x", result_file.describe_machine(),
                             [{"case": "a", "tokens/s": 92.123}], {"tokens/s": "{:.1f}"})
    assert sorted(p.name for p in results.iterdir()) == ["bench_x.json"]  # no .tmp left behind
    written = json.loads((results / "bench_x.json").read_text())
    assert written["source"] == "measured" and written["command"] == "python bench/bench_x.py --json out.json"
    assert _render("--doc", str(doc), "--results", str(results)).returncode == 0
    assert "| a | 92.1 |\n" in doc.read_text() and "load average" in doc.read_text()
