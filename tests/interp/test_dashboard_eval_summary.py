"""The dashboard shows the held-out FVU without outlier rows beside the overall FVU."""

import json

from saejax.interp.dashboard import eval_summary


def test_the_outlier_free_fvu_stands_beside_the_overall_one(tmp_path):
    assert eval_summary(str(tmp_path)) == ""  # no eval.json: an unfinished run
    figures = {
        "fvu": 0.0795,
        "fvu_without_outliers": 0.266,
        "outlier_rows": 3,
        "outlier_norm_ratio": 10.0,
        "l0": 32.0,
    }
    (tmp_path / "eval.json").write_text(json.dumps(figures))
    line = eval_summary(str(tmp_path))
    assert "held-out FVU 0.0795" in line
    assert "without outliers 0.2660 (3 rows with norm &gt; 10× the median left out)" in line
    (tmp_path / "eval.json").write_text(json.dumps({"fvu": 0.5}))  # written before the metric
    assert eval_summary(str(tmp_path)) == '<p id="eval">held-out FVU 0.5000</p>'
