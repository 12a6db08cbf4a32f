"""calft.cli: as_flags writes the flags that add_flags' parser reads back to the same values."""
import argparse
import shlex
from dataclasses import dataclass

from calft.cli import add_flags, as_flags, knob


@dataclass
class Knobs:
    lr: float = knob(1.0, "a float")
    family_draws: str = knob("x=1", "a string, here set empty")
    family_balance: bool = knob(True, "a bool, here set false")
    share_prompt: bool = knob(False, "a bool, here set true")
    adapter: list = knob((), "a repeatable flag")


def test_as_flags_round_trips_through_add_flags():
    values = {"lr": 0.01, "family_draws": "", "family_balance": False, "share_prompt": True,
              "adapter": ["runs/a b", "runs/c"]}
    text = as_flags(values)
    assert text == ("--adapter 'runs/a b' --adapter runs/c --no-family-balance --family-draws '' --lr 0.01 "
                    "--share-prompt")
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    add_flags(parser, Knobs, {})
    assert vars(parser.parse_args(shlex.split(text))) == values
