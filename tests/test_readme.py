"""The README's Python blocks run, in order, in one namespace, so they cannot rot."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_states_the_two_setup_commands():
    commands = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert len(commands) == 2
    assert "-m torchex_fn demo" in commands[0] and '".[test]"' in commands[1] and "pytest" in commands[1]
