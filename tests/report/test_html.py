from saelab.report.html import Report, format_value
from saelab.report.plots import plot_lines, plot_training_curves


def test_text_is_escaped_and_figures_embedded(tmp_path) -> None:
    png = plot_lines({"a": ([1, 2], [3, 4])}, tmp_path / "p.png", xlabel="x", ylabel="y")
    report = Report("t <b>")
    report.paragraph("<script>alert(1)</script>")
    report.table([{"token": "<script>", "fvu": 0.123456}])
    report.figure(png, "cap")
    page = report.write(tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>0.1235</td>" in page
    assert page.count("data:image/png;base64,") == 1


def test_format_value() -> None:
    assert format_value(1234567.0) == "1.235e+06"
    assert format_value(3) == "3"
    assert format_value(float("nan")) == "nan"


def test_training_curves_png(tmp_path) -> None:
    records = [{"tokens": i * 100, "loss": 1.0 / (i + 1), "l0": 32.0} for i in range(5)]
    path = plot_training_curves(records, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
