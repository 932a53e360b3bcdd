"""`python -m trainer.run`: the main job.

Without arguments it runs the whole two-stage recipe on the embedded toy task on CPU
(trainer/toy/recipe.py). With --config (and optional section.key=value overrides) it runs that
stage, SFT or GRPO, on your model and data.
"""

import argparse
import sys

from .config import ConfigError, load_config
from .data import DataError
from .engine import TrainingError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run configuration (see configs/)")
    parser.add_argument("--resume", choices=["auto", "none"], help="auto: continue from the latest complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=2e-5")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.config is None and not args.overrides:
        from .toy.recipe import run_toy_recipe

        run_toy_recipe()
        return
    try:
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        config = load_config(args.config, overrides)
        if config.stage == "grpo":
            from .grpo import run_grpo

            run_grpo(config)
        else:
            from .sft import run_sft

            run_sft(config)
    except (ConfigError, DataError) as error:
        # Bad input is a one-line message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
