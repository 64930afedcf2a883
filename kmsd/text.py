"""Text that a client or a remote host chose, made inert before it is shown to a person.

A workstation name, an ePID or a product name arrives from the network. Written as is to a
terminal, its control characters would move the cursor or erase lines (and so forge log lines
or table rows); bidirectional overrides and isolates would make it read backwards. `inert`
writes each such character as its Python escape (`\\x1b`, `\\u202e`), as `repr` does, and
leaves all other text alone. JSON outputs need none of this: JSON escaping keeps them exact.
"""

from __future__ import annotations

# C0 controls, DEL and C1 controls (ESC and CSI among them: terminal commands); the
# bidirectional marks, embeddings, overrides and isolates; the Unicode line and paragraph
# separators (which some viewers break lines at).
UNSAFE = (
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x061C,  # ARABIC LETTER MARK
    0x200E,  # LEFT-TO-RIGHT MARK
    0x200F,  # RIGHT-TO-LEFT MARK
    0x2028,  # LINE SEPARATOR
    0x2029,  # PARAGRAPH SEPARATOR
    *range(0x202A, 0x202F),  # embeddings and overrides: LRE, RLE, PDF, LRO, RLO
    *range(0x2066, 0x206A),  # isolates: LRI, RLI, FSI, PDI
)
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in UNSAFE}


def inert(text: str) -> str:
    """`text` with every control character and bidirectional control written as its escape."""
    # Every unsafe character is one str.isprintable() rejects, so printable text (nearly
    # all of it) costs one scan in C.
    return text if text.isprintable() else text.translate(_ESCAPES)
