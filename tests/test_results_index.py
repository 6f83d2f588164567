"""The results index (experiments/results_index.py) and the committed results files it reads."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_index", ROOT / "experiments" / "results_index.py")
results_index = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_index)


@pytest.fixture
def results(tmp_path):
    """Two tiny results folders' worth: one file in a study subfolder with its .md,
    one at the top level with command and config but no .md."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "quick.json").write_text(json.dumps({
        "experiment": "quick", "git_commit": "abc123", "machine": {"cpu_count": 2, "devices": "1 x cpu",
                                                                     "jax_backend": "cpu"},
        "records": [
            {"method": "dense", "size": 1.0, "kept_fraction": 1.0, "perplexity": 31.53791928925552},
            {"method": "ppn", "size": 0.5, "kept_fraction": 0.49971797374986443, "perplexity": 41.43014895075571,
             "prefill_ratio": 1.6478597779554038, "decode_ratio": None, "seconds": 3.0},
        ]}))
    (tmp_path / "bench" / "quick.md").write_text("# Benchmark on a tiny model\n\n| table |\n")
    (tmp_path / "bench" / "quick.plan.json").write_text('{"format": "a plan, not a results file"}')
    (tmp_path / "memory_peak.json").write_text(json.dumps({
        "experiment": "memory_peak", "git_commit": "def456", "command": "experiments/memory.py --steps 5",
        "config": {"steps": 5}, "records": [{"phase": "load", "peak_gib": 0.8004837036132812},
                                            {"phase": "steps", "peak_gib": 9.78677749633789}]}))
    return tmp_path


def test_build_index_has_a_section_per_file_grouped_by_study(results):
    index = results_index.build_index(results)
    # groups: the subfolder, and the top-level file's name up to the first "_", alphabetical
    assert index.index("## bench\n") < index.index("## memory\n")
    assert "plan" not in index  # plans kept beside results are not results
    assert "- [bench](#bench): 1 file" in index and "- [memory](#memory): 1 file" in index
    bench = index[index.index("## bench\n"):index.index("## memory\n")]
    assert "### [bench/quick.json](bench/quick.json): Benchmark on a tiny model" in bench
    assert "- commit: `abc123`" in bench and "- machine: 2 CPU cores, 1 x cpu (cpu)" in bench
    assert "- command: not recorded in the file" in bench and "- config: not recorded in the file" in bench
    assert "| method | size | kept_fraction | perplexity | prefill_ratio | decode_ratio |" in bench
    assert "| ppn | 0.5 | 0.4997 | 41.43 | 1.648 |  |" in bench  # 4 significant digits, None empty
    assert "seconds" not in bench  # only the index's columns
    memory = index[index.index("## memory\n"):]
    assert "### [memory_peak.json](memory_peak.json): memory_peak" in memory  # no .md: the experiment's name
    assert "- command: `experiments/memory.py --steps 5`" in memory and "- config: embedded" in memory
    assert "| phase | peak_gib |" in memory and "| steps | 9.787 |" in memory  # its own fields


def test_main_keeps_the_findings_and_check_sees_changes(results):
    readme = results / "README.md"
    readme.write_text("# Results\n\n## Findings\n\nHand-written.\n")
    assert results_index.main(["--results-dir", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("# Results\n\n## Findings\n\nHand-written.\n\n" + results_index.MARKER)
    assert text.endswith(results_index.build_index(results))
    assert results_index.main(["--results-dir", str(results), "--check"]) == 0
    assert results_index.main(["--results-dir", str(results)]) == 0 and readme.read_text() == text  # idempotent
    (results / "bench" / "more.json").write_text(json.dumps({"records": []}))
    assert results_index.main(["--results-dir", str(results), "--check"]) == 1
    assert readme.read_text() == text  # --check writes nothing


def test_every_committed_results_file_parses_and_has_records():
    files = results_index.results_files(ROOT / "results")
    assert files, "no results files found"
    for path in files:
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(doc.get("records"), list), f"{path.relative_to(ROOT)} has no list of records"


def test_headline_rows_come_from_the_named_records(results):
    spec = {"sizes": [0.5], "row": [
        {"label": "**ours**", "file": "bench/quick.json", "method": "ppn", "bold": True},
        {"label": "dense", "file": "bench/quick.json", "method": "dense", "size": 1.0}]}
    table = results_index.headline(spec, results)
    assert table.splitlines()[0] == "| method | training tokens | ppl 0.5 | speed-up 0.5 |"
    assert "| **ours** |  | **41.43** |  |" in table  # no decode ratio recorded: no speed-up shown
    assert "| dense |  | 31.54 |  |" in table
    with pytest.raises(ValueError, match="bench/quick.json has no record of method 'ppn' at size 0.3"):
        results_index.headline({"sizes": [0.3], "row": spec["row"][:1]}, results)
    readme = "intro\n" + results_index.HEADLINE_START + "\nold\n" + results_index.HEADLINE_END + "\nafter\n"
    assert results_index.render_headline(readme, table, "R") == ("intro\n" + results_index.HEADLINE_START + "\n"
                                                                  + table + results_index.HEADLINE_END + "\nafter\n")
    with pytest.raises(ValueError, match="lacks the headline markers"):
        results_index.render_headline("no markers", table, "R")


def test_the_committed_index_and_readme_headline_are_current():
    assert results_index.main(["--check"]) == 0, "run python experiments/results_index.py"
