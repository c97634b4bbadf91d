"""Stage plots_template: the page of ``dvc plots show`` with Vega inlined, so that the charts render offline."""

from pipeline.cli import run_stage
from pipeline.plots import TEMPLATE, write_offline_page


def main():
    write_offline_page(TEMPLATE)


if __name__ == "__main__":
    run_stage(main)
