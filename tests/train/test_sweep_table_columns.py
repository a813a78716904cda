"""The sweep table carries the held-out conventions: explained variance, FVU without outlier
rows and the median relative error, taken from each member's eval.json."""

import csv
import json

from saejax.train.sweep_table import write_table


def test_sweep_table_reads_the_new_metrics_from_eval_json(tmp_path, capsys):
    rows = []
    for d_sae, fvu in ((64, 0.2), (128, 0.1)):
        run = tmp_path / f"d{d_sae}"
        run.mkdir()
        (run / "eval.json").write_text(
            json.dumps(
                {
                    "fvu": fvu,
                    "explained_variance": 1 - fvu,
                    "fvu_without_outliers": fvu + 0.2,
                    "outlier_rows": 4,
                    "median_relative_error": fvu / 2,
                    "silent_in_eval_fraction": 0.0,
                    "never_fired": 0,
                }
            )
        )
        rows.append(
            {
                "name": f"d{d_sae}",
                "run_dir": str(run),
                "architecture": "topk",
                "d_sae": d_sae,
                "k": 4,
                "l1": None,
                "fvu": fvu,
                "l0": 4.0,
                "dead_fraction": 0.0,
                "dense_fraction": 0.0,
                "tokens_per_s": 1000.0,
                "sweep_wall_s": None,
            }
        )
    write_table(rows, str(tmp_path))
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["fvu_without_outliers"]) == 0.1 + 0.2
    assert float(table[1]["explained_variance"]) == 1 - 0.1
    assert float(table[0]["median_relative_error"]) == 0.1
    md = (tmp_path / "sweep.md").read_text()
    assert "FVU w/o outliers" in md and "| 128 | 4 | 0.1000 | 0.3000 | 0.050 |" in md
    members = json.loads((tmp_path / "sweep.json").read_text())["members"]
    assert members[0]["never_fired"] == 0


def test_members_not_timed_alone_show_a_dash_and_say_why(tmp_path):
    """A sweep run with time_alone off has no tokens/s of its own per member: the table shows
    "–" there (an empty CSV cell) and one line saying so, and the plot leaves the points out."""
    rows = [
        {
            "name": f"d{d_sae}",
            "run_dir": str(tmp_path / f"d{d_sae}"),
            "d_sae": d_sae,
            "k": 4,
            "l1": None,
            "fvu": 0.1,
            "l0": 4.0,
            "dead_fraction": 0.0,
            "tokens_per_s": None,
            "sweep_wall_s": 12.0,
        }
        for d_sae in (64, 128)
    ]
    write_table(rows, str(tmp_path))
    md = (tmp_path / "sweep.md").read_text()
    assert "| 0.0% | – | " in md and "did not time the member's step alone" in md
    with open(tmp_path / "sweep.csv") as f:
        assert [r["tokens_per_s"] for r in csv.DictReader(f)] == ["", ""]
    assert (tmp_path / "sweep.png").stat().st_size > 0
