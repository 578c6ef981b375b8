"""The midfill custom resources (group midfill.dev, version v1alpha1) as pydantic models.

Untrusted input (YAML files, CR bodies from the API server) is parsed once, here, into these
types; everything inside midfill takes typed objects.
"""

from midfill.api.common import (
    API_VERSION,
    GROUP,
    VERSION,
    Condition,
    NodePool,
    ObjectMeta,
    ResourceRequirements,
    Toleration,
    get_condition,
    now_rfc3339,
    set_condition,
)
from midfill.api.load import (
    KINDS,
    FieldError,
    Resource,
    SpecError,
    load_documents,
    load_file,
    normalize_kind,
    parse_resource,
)
from midfill.api.modelrelease import ModelRelease, ModelReleaseSpec, ModelReleaseStatus
from midfill.api.trainingrun import (
    EXIT_CODE_INVALID_CONFIG,
    RECIPE_NAMES,
    TrainingRun,
    TrainingRunSpec,
    TrainingRunStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "KINDS",
    "RECIPE_NAMES",
    "EXIT_CODE_INVALID_CONFIG",
    "Condition",
    "NodePool",
    "ObjectMeta",
    "ResourceRequirements",
    "Toleration",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "ModelRelease",
    "ModelReleaseSpec",
    "ModelReleaseStatus",
    "FieldError",
    "SpecError",
    "Resource",
    "get_condition",
    "set_condition",
    "now_rfc3339",
    "load_documents",
    "load_file",
    "normalize_kind",
    "parse_resource",
]
