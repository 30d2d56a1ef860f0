"""What the command line promises, checked by the tests that drive it: one_line() (the error contract: one line,
`ivl-fast <cmd>: error: ...`, exit code 2, no traceback), check_flags_explained() (every flag has help text and
shows its default), check_required_listed() (required flags under "required")."""

from __future__ import annotations

import argparse
import re

from ivl_fast.cli import build_parser


def one_line(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and "it/s" not in ln and "step/s" not in ln]
    assert rc == 2 and "Traceback" not in err, err
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def check_flags_explained(command: str) -> None:
    p = _subparsers()[command]
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings} has no help text"
        # identity, not ==: a default of 0 or 0.0 is shown (it equals False, but it is a value)
        off = any(action.default is x for x in (None, False))
        has_default = not off and not action.required and "default" not in action.help
        if has_default:
            shown = f"(default: {action.default})"
            assert shown in " ".join(text.split()), f"{command} {action.option_strings}: {shown} not in --help"
        else:
            assert "(default: None)" not in text and "(default: False)" not in text


def check_required_listed(command: str, required: list[str]) -> None:
    p = _subparsers()[command]
    group = next(g for g in p._action_groups if g.title == "required")
    assert sorted(s for a in group._group_actions for s in a.option_strings) == sorted(required)
    assert "required:" in p.format_help()
