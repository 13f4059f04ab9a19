"""Settings of the chaos run's processes: the project's settings module as shipped
(``CHAOS_BASE_SETTINGS``, ``project.settings`` unless told), with only what the run's
traffic needs on top: the named email backends it sends through (``CHAOS_BACKENDS``, as
JSON, each pointed at a listener of the run's mail server) and the directory of the
templates its templated notifications name.

Nothing the pipeline's guarantees depend on is changed here: the run proves the base
settings, and its report quotes both additions.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import import_module
from pathlib import Path

_base = import_module(os.environ.get("CHAOS_BASE_SETTINGS", "project.settings"))
globals().update({name: getattr(_base, name) for name in dir(_base) if name.isupper()})

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

TEMPLATES = copy.deepcopy(_base.TEMPLATES)
TEMPLATES[0]["DIRS"] = [*TEMPLATES[0].get("DIRS", []), TEMPLATES_DIR]

if os.environ.get("CHAOS_BACKENDS"):
    NOTIFICATIONS_BACKENDS = json.loads(os.environ["CHAOS_BACKENDS"])
