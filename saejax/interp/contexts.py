"""A store row shown in its context: the text around it with the row's token marked
[[like this]], on one line (for terminals, logs and LLM prompts).

Corpus text is untrusted: an escape sequence in it (a window title, a screen clear, a fake
prompt) must not reach the user's terminal, so every control character is shown as a
visible escape such as \\x1b."""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1


def visible(text: str, one_line: bool = True) -> str:
    """`text` with control characters made visible (\\x1b); a newline becomes ⏎ when
    `one_line`, else stays a newline."""

    def show(match: re.Match) -> str:
        c = match.group()
        if c == "\n":
            return "⏎" if one_line else "\n"
        return f"\\x{ord(c):02x}"

    return _CONTROL.sub(show, text)


def marked_context(tok, ids, at: int, one_line: bool = True) -> str:
    """Decoded `ids` with token `at` in [[ ]], control characters shown as escapes and
    newlines as ⏎ when `one_line`."""
    text = f"{tok.decode(ids[:at])}[[{tok.decode(ids[at : at + 1])}]]{tok.decode(ids[at + 1 :])}"
    return visible(text, one_line)
