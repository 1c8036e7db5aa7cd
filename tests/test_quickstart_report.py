"""
The quickstart's report (examples/quickstart/report.py) on small inputs with
known answers: class grids, the results table and CSV, the words on trends, and the
layout of the trade-off plot and the composite picture.
"""

import csv

import numpy as np

from examples.quickstart import report as quickstart_report


def test_class_grid_puts_class_c_in_row_c():
    labels = np.array([1, 0, 2, 1, 0, 2, 1])
    images = np.zeros((7, 2, 2, 1), np.uint8)
    for index, label in enumerate(labels):
        images[index] = 10 * label + index
    grid = quickstart_report.class_grid(images, labels, num_classes=3, columns=2)
    assert grid.shape == (3 * 4 + 2, 2 * 4 + 2, 1)
    cells = [[grid[2 + 4 * row, 2 + 4 * column, 0] for column in range(2)] for row in range(3)]
    assert cells == [[1, 4], [10, 13], [22, 25]]


ROWS = [
    dict(classifier_scale=0.0, recognised=0.8, precision=0.6, recall=0.7),
    dict(classifier_scale=1.0, recognised=0.9, precision=0.65, recall=0.5),
    dict(classifier_scale=10.0, recognised=0.95, precision=0.7, recall=0.2),
]


def test_results_table_and_csv(tmp_path):
    assert quickstart_report.results_table(ROWS[:2]).splitlines() == [
        "| classifier scale | recognised as the requested class | precision | recall |",
        "| ---: | ---: | ---: | ---: |",
        "| 0 | 0.800 | 0.600 | 0.700 |",
        "| 1 | 0.900 | 0.650 | 0.500 |",
    ]
    quickstart_report.write_results_csv(ROWS, str(tmp_path / "results.csv"))
    with open(tmp_path / "results.csv") as f:
        assert [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)] == ROWS


def test_describe_trends_reports_the_trade_off_only_when_the_numbers_show_it():
    text = quickstart_report.describe_trends(ROWS)
    assert "- recognised rises at every step (0.800 -> 0.950)" in text
    assert "- recall falls at every step (0.700 -> 0.200)" in text
    assert "The fidelity-diversity trade-off shows" in text
    flat_precision = [dict(row, precision=0.6 + 0.1 * (index == 1)) for index, row in enumerate(ROWS)]
    text = quickstart_report.describe_trends(flat_precision)
    assert "- precision ends where it starts (0.600 -> 0.600)" in text
    assert "does not fully show" in text
    mixed = [dict(row, recall=value) for row, value in zip(ROWS, (0.5, 0.6, 0.4))]
    assert "- recall falls overall, not at every step" in quickstart_report.describe_trends(mixed)


def test_pictures_have_the_expected_layout():
    plot = quickstart_report.draw_tradeoff_plot(ROWS, width=400, height=260)
    assert plot.size == (400, 260) and plot.mode == "RGB"
    grid = np.full((30, 20, 3), 128, np.uint8)
    picture = quickstart_report.overview_picture([("a", grid)] * 4, plot, zoom=2)
    # Two by two grids of 40 x (60 + caption) with 12-pixel gaps, then the plot.
    assert picture.width == 12 + 2 * 40 + 12 + 12 + 400 + 12
    assert picture.height == max(2 * (60 + 24) + 12, 260) + 24
