"""``python3 -m demo [--task vqa|vgd|itm|all] [--root R] [--seed N] [--force]``: build the
demo data of one task or all three and print their statistics (``python3 -m demo.<task>``
builds one, the same way)."""
from demo import DEMO_BUILDERS, MARKER_DIRS
from demo.build import cli_tasks


def main(argv: list[str] | None = None) -> None:
    cli_tasks("Build the synthetic demo datasets.",
              {name: (MARKER_DIRS[name], DEMO_BUILDERS[name]) for name in MARKER_DIRS}, argv)


if __name__ == "__main__":
    main()
