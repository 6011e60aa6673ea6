"""``python -m llm_engine.training [train options]`` (also ``torchrun ... -m llm_engine.training``)."""

import argparse
import sys

from llm_engine.training.cli import add_train_arguments, handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_engine.training",
                                     description="Train a model (same options as llm-engine train).")
    add_train_arguments(parser)
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
