"""``pdl1``'s words for the library's settings: its options, in the advice of the library's messages (their
:class:`inference.advice.SettingWords`; the library's own name its arguments, which a Python caller or the
service's client has, not ``pdl1``'s options).

Apart from :mod:`bridge.cli`, so that :mod:`bridge.run` (``pdl1 run``'s batch and its Ray workers) passes them
without importing typer; imports nothing.
"""

from __future__ import annotations

from collections.abc import Callable


def _given(option: str, value: object) -> str:
    """``option`` alone (no value, or a flag's True), else with its value as typed (None is ``none``); a list or
    tuple is the option repeated, once a value (Typer's repeatable options take no comma-separated list).

    >>> _given("--folds", ["0", "1"])
    '--folds 0 --folds 1'
    """
    if value is ... or value is True:
        return option
    if isinstance(value, list | tuple):
        return " ".join(_given(option, v) for v in value)
    return f"{option} {'none' if value is None else value}"


def option_setting(name: str, value: object = ..., /) -> str:
    """A setting as the option of the same name gives it (``pdl1 run``'s and ``pdl1 serve``'s words:
    ``check_runtime``'s and :class:`inference.Models`' ``setting``).

    >>> option_setting("runtime", "torch"), option_setting("compile", True), option_setting("patch_px")
    ('--runtime torch', '--compile', '--patch-px')
    """
    return _given("--" + name.replace("_", "-"), value)


def option_words(**renamed: str) -> Callable[..., str]:
    """The words of a command whose options are the settings' names (:func:`option_setting`) but for those
    ``renamed`` (``init_model="--init"``).

    >>> words = option_words(init_model="--init")
    >>> words("init_model", None), words("init_model"), words("resume", True)
    ('--init none', '--init', '--resume')
    """

    def words(name: str, value: object = ..., /) -> str:
        return _given(renamed[name], value) if name in renamed else option_setting(name, value)

    return words
