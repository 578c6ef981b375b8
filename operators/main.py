"""The midfill operator: registers kopf handlers. Run it with `midfill operator` or
`kopf run -m operators.main` (add --all-namespaces or --namespace=NS and --standalone/--peering)."""

from __future__ import annotations

from typing import Any

import kopf

from operators import startup
from operators.modelrelease import handlers as _modelrelease  # noqa: F401  (registers handlers)
from operators.trainingrun import handlers as _trainingrun  # noqa: F401  (registers handlers)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    startup.configure(settings, memo, logger)
