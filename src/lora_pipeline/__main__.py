"""``python -m lora_pipeline [kedro run options]`` is exactly ``kedro run`` (Kedro's project entry point).

The project's own commands are ``lora-pipeline`` (``lora_pipeline.cli``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(*args, **kwargs):
    from kedro.framework.cli.utils import find_run_command
    from kedro.framework.project import configure_project

    package_name = Path(__file__).parent.name
    configure_project(package_name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    return find_run_command(package_name)(*args, **kwargs)


if __name__ == "__main__":
    main()
