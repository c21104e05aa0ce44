"""README keeps exactly two set-up commands, and CI runs the second one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2
    main_job, tests = commands
    assert "pip install -e ." in main_job and "vit2trt" in main_job
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()
