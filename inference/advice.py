"""How the library's messages name a setting their fix changes, in the words of whoever called it.

The same code is called by ``pdl1``, the HTTP service and Python users, and only one of them has options: the
library's own words (:func:`library_setting`) are its arguments and config fields (``runtime='torch'``,
``patch_px``), and a caller passes its users' instead (``pdl1`` its options, :mod:`bridge.options`:
``--runtime torch``, ``--patch-px``). Imports nothing of this package, so any module may use it.
"""

from __future__ import annotations

from typing import Protocol


class SettingWords(Protocol):
    """One of the library's settings (``name``: its argument or config field) in a caller's user's words, for a
    message's advice: ``words(name)`` names the setting, ``words(name, value)`` gives it ``value``.

    ``...`` (the default) stands for no value, as None may be one (``init_model=None``: train from scratch).
    """

    def __call__(self, name: str, value: object = ..., /) -> str: ...


def library_setting(name: str, value: object = ..., /) -> str:
    """A setting as the library names it: its argument or config field (the default :class:`SettingWords`).

    >>> library_setting("runtime", "torch"), library_setting("compile", True), library_setting("patch_px")
    ("runtime='torch'", 'compile=True', 'patch_px')
    """
    return name if value is ... else f"{name}={value!r}"


def renamed(setting: SettingWords, **names: str) -> SettingWords:
    """``setting`` for a function called with what its caller names otherwise: ``names`` maps the function's
    name of a setting to the caller's (a trainer passes its ``validation_slides`` as ``held_out``).

    >>> renamed(library_setting, held_out="validation_slides")("held_out")
    'validation_slides'
    """

    def words(name: str, value: object = ..., /) -> str:
        return setting(names.get(name, name), value)

    return words
