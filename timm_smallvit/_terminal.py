"""What is printed from data (labels, file names, names from metadata) escaped for the terminal: one helper."""

__all__ = ['printable']


def printable(value: object) -> str:
    """``str(value)`` with every character that is not printable escaped (``\\n``, ``\\x1b``, ``\\u202e``, ...).

    A label, a file name or a value from a model's metadata may hold a newline (which would forge a line of the
    output), an ESC sequence (a title change, a cleared screen) or a bidi override (text shown in another order):
    escaped, each is shown as what it is and acts as nothing. Printable characters, other alphabets included, stay.

    Args:
        value: Anything; its ``str()`` is escaped.
    """
    return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii') for c in str(value))
