"""A store row shown in its context: the text around it with the row's token marked
[[like this]], on one line (for terminals, logs and LLM prompts)."""

from __future__ import annotations


def marked_context(tok, ids, at: int, one_line: bool = True) -> str:
    """Decoded `ids` with token `at` in [[ ]]; newlines shown as ⏎ when `one_line`."""
    text = f"{tok.decode(ids[:at])}[[{tok.decode(ids[at : at + 1])}]]{tok.decode(ids[at + 1 :])}"
    return text.replace("\n", "⏎") if one_line else text
