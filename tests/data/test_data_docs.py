"""docs/data.md's table of data defaults is the code's: a changed default without the doc fails here."""
from pathlib import Path

import yaml

from moe_asr.data.config import DataConfig
from moe_asr.schema import to_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_documented_defaults_are_the_code_defaults():
    text = DOC.read_text()
    block = text[text.index("<!-- data defaults -->"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == {"data": to_dict(DataConfig())}
