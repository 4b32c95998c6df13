"""The benchmark report refuses prose figures that no stored result supports."""

from __future__ import annotations

from bench.common import DOCS, ROOT
from bench.report import PROSE_DOCS, accuracy_targets, unsupported_figures

TABLES = "| method | average |\n| --- | ---: |\n| OTMF | 65.7 |\n"


def test_a_figure_is_supported_by_the_tables_or_by_a_result_its_paragraph_names():
    # accuracy.json holds weight averaging's mean accuracy (0.622 on the build committed with it: 62.2%).
    cited = "Weight averaging scores 62.2% (`accuracy.json`), OTMF 65.7%."
    assert unsupported_figures(cited, TABLES) == []
    uncited = "Weight averaging scores 62.2%, OTMF 65.7%."
    assert [m.split()[0] for m in unsupported_figures(uncited, TABLES)] == ["62.2"]
    invented = "OTMF scores 93.17% (`accuracy.json`)."
    assert [m.split()[0] for m in unsupported_figures(invented, TABLES)] == ["93.17"]
    # The name of a result cited in another paragraph supports nothing here.
    assert unsupported_figures("Source: `accuracy.json`.\n\nWeight averaging scores 62.2%.", TABLES)


def test_only_figures_marked_as_unstored_are_exempt():
    marked = "<!-- unstored -->\nMeasured before results were kept: 11.5 s.\n<!-- /unstored -->\n\nOTMF 65.7%."
    assert unsupported_figures(marked, TABLES) == []
    assert unsupported_figures(marked.replace("<!-- /unstored -->", ""), TABLES)


def test_the_committed_prose_is_supported_by_the_committed_results():
    notes = (ROOT / "bench" / "notes.md").read_text().strip()
    doc = (DOCS / "benchmarks.md").read_text()
    assert notes in doc  # the doc was rendered from these notes
    tables = doc.replace(notes, "")
    for text in [notes, *((ROOT / name).read_text() for name in PROSE_DOCS)]:
        assert unsupported_figures(text, tables) == []


def test_version_numbers_are_not_figures():
    assert unsupported_figures("Needs Python 3.11 and torch==2.14.1 (arXiv 2511.19561).", TABLES) == []


def _target_rows(replay_normalized: float) -> list[str]:
    """The targets table of a result holding weight averaging and one replay row."""
    free = {"method": "weight_average", "head_tuning": False, "params": {}, "label": "weight averaging",
            "avg_accuracy": {"mean": 0.62}, "normalized": {"mean": 0.69}}
    replay = {"method": "otmf", "head_tuning": False, "params": {"pre_data": "reservoir"}, "label": "OTMF + replay",
              "avg_accuracy": {"mean": 0.81}, "normalized": {"mean": replay_normalized}}
    return accuracy_targets("image", {"orders": [[0]], "methods": {"weight_average": free, "r": replay}})


def test_a_normalized_accuracy_just_under_its_floor_is_not_rounded_onto_it():
    assert [r for r in _target_rows(0.89968) if "normalized" in r] == [
        "| OTMF + replay ≥ 0.90 normalized (image, 1 task order) | 0.8997 | **missed** |"]
    assert "| 0.912 | **met** |" in _target_rows(0.91234)[-1]
