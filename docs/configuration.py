"""Makes docs/configuration.md, the reference of every configuration key, from translate/config.py
(each key's meaning is the comment beside or above its field there):

    python docs/configuration.py

tests/test_docs.py fails when the page and the code differ.
"""

from __future__ import annotations

from pathlib import Path

from translate.config import reference_markdown

PAGE = Path(__file__).with_name("configuration.md")


def main() -> None:
    PAGE.write_text(reference_markdown(), encoding="utf-8")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
