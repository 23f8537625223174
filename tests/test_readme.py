from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2] == "```bash" and lines[5] == "```"
    install_and_demo, install_and_test = lines[3], lines[4]
    assert install_and_demo.endswith("evomerge demo") and "-c constraints.txt" in install_and_demo
    assert "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
