"""The README's examples run as written (every ```python block, in order, in one namespace)."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
  text = open(README, encoding="utf-8").read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "the README has no python example"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  assert namespace["check"].ok and namespace["surgery"].report.preserved is True
