from click.testing import CliRunner

from translate.cli import main


def test_plot_and_attend_write_pngs(run_with_steps, tmp_path):
    curves = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(run_with_steps), "-o", str(curves)])
    assert result.exit_code == 0, result.output
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 10_000
    heat = tmp_path / "attn.png"
    result = CliRunner().invoke(main, ["attend", str(run_with_steps), "El gato come pan.", "-o", str(heat)])
    assert result.exit_code == 0, result.output
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "no metrics file" in missing.output
