"""`python -m trainer.run`: the main job.

Without arguments it runs the whole two-stage recipe on the embedded toy task on CPU
(configs/toy.yaml, trainer/toy/recipe.py). With --config (and optional section.key=value
overrides) it runs that stage (SFT, GRPO, or eval at token budgets) on your model and data;
a config with `recipe: toy` runs the toy recipe with those settings.
"""

import argparse
import sys

from .config import load_config
from .errors import ConfigError, DataError, TrainingError
from .hub import local_model_dir


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run configuration (see configs/)")
    parser.add_argument("--stage", choices=["sft", "grpo", "eval"], help="the same as stage=...")
    parser.add_argument("--resume", choices=["auto", "none"], help="auto: continue from the latest complete checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="first plan the stage's GPU memory (python -m trainer.plan) and stop if it does not fit")
    parser.add_argument("--epoch-ablation", action="store_true",
                        help="toy recipe: SFT for the epoch counts in epoch_ablation and the configured one, compared")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=2e-5")
    return parser.parse_args(argv)


def is_toy_config(path):
    from .toy.recipe import is_toy_config as check

    return check(path)


def run_toy(args):
    from .toy.recipe import run_epoch_ablation, run_toy_recipe

    if args.epoch_ablation:
        run_epoch_ablation(args.config, args.overrides)
    else:
        run_toy_recipe(args.config, args.overrides)


def main(argv=None):
    args = parse_args(argv)
    try:
        no_arguments = args.config is None and not args.overrides and args.stage is None
        if no_arguments or args.epoch_ablation or (args.config and is_toy_config(args.config)):
            if args.stage:
                raise ConfigError(f"{args.config}: the toy recipe runs all its stages in turn; leave out --stage")
            if args.plan:
                raise ConfigError("--plan plans a --config file's stage; the toy recipe builds its model as it runs")
            run_toy(args)
            return
        overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        overrides += [f"stage={args.stage}"] if args.stage else []
        config = load_config(args.config, overrides)
        if args.plan:
            from .plan import preflight

            preflight(args.config, overrides, config.stage)
        config.model.path = local_model_dir(config.model.path)  # a Hub name becomes its cached snapshot
        if config.stage == "eval":
            from .evaluate import run_eval

            run_eval(config)
        elif config.stage == "grpo":
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
