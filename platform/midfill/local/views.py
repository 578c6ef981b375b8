"""How `midfill get` and `midfill describe` show stored resources (pure functions of the records)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import yaml

from midfill.local.state import StoredResource

TR_COLUMNS = ("NAME", "PHASE", "NODES", "STEP", "LOSS", "MFU", "VERSION", "AGE")
MR_COLUMNS = ("NAME", "PHASE", "MODEL", "VERSION", "URL", "AGE")


def age(timestamp: str | None, *, now: dt.datetime | None = None) -> str:
    """kubectl-style age: 45s, 12m, 3h, 2d."""
    if not timestamp:
        return "<unknown>"
    try:
        then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "<unknown>"
    seconds = max(0, int(((now or dt.datetime.now(dt.UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def training_row(record: StoredResource) -> tuple[str, ...]:
    status = record.status()
    spec = record.resource["spec"]
    par = spec.get("parallelism", {})
    nodes = record.local.layout or f"{par.get('numNodes', 1)}x{par.get('nprocPerNode', 1)}"
    prog = status.progress
    step = "-"
    if prog is not None:
        step = f"{prog.step}/{prog.total_steps}" if prog.total_steps else str(prog.step)
    loss = f"{prog.loss:.3f}" if prog is not None and prog.loss is not None else "-"
    mfu = f"{prog.mfu:.1%}" if prog is not None and prog.mfu is not None else "-"  # unset on CPUs: peak unknown
    version = status.registered_model.version if status.registered_model else "-"
    return (
        record.name,
        status.phase,
        nodes,
        step,
        loss,
        mfu,
        version,
        age(record.resource["metadata"].get("creationTimestamp")),
    )


def release_row(record: StoredResource) -> tuple[str, ...]:
    status = record.status()
    model = record.resource["spec"]["model"]
    ref = model["registeredModelName"] + (
        f"/{model['version']}" if model.get("version") else f"@{model.get('alias') or 'champion'}"
    )
    version = status.stable_version or "-"
    return (
        record.name,
        status.phase,
        ref,
        version,
        status.url or "-",
        age(record.resource["metadata"].get("creationTimestamp")),
    )


def table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by three spaces, as kubectl prints them."""
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    lines = [
        "   ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [columns, *rows]
    ]
    return "\n".join(lines)


def get_table(kind: str, records: list[StoredResource]) -> str:
    if kind == "TrainingRun":
        return table(TR_COLUMNS, [training_row(r) for r in records])
    return table(MR_COLUMNS, [release_row(r) for r in records])


def as_output(records: list[StoredResource], fmt: str, *, single: bool) -> str:
    """-o yaml|json: the stored objects (spec + status) as the API server would return them."""
    objs: Any = [r.resource for r in records]
    if not single:
        objs = {"apiVersion": "v1", "kind": "List", "items": objs}
    else:
        objs = objs[0]
    if fmt == "json":
        return json.dumps(objs, indent=2)
    return yaml.safe_dump(objs, sort_keys=False).rstrip()


def _spec_summary(record: StoredResource) -> list[tuple[str, str]]:
    spec = record.resource["spec"]
    if record.kind == "TrainingRun":
        tr = spec["training"]
        par = spec.get("parallelism", {})
        sources = ", ".join(s["uri"] for s in spec["data"]["sources"])
        length = f"{tr['steps']} steps" if tr.get("steps") else f"{tr.get('tokens')} tokens"
        return [
            ("Recipe", spec.get("model", {}).get("recipe", "debug")),
            ("Data", sources),
            ("Training", f"{length}, seqLength {tr.get('seqLength')}, globalBatchTokens {tr.get('globalBatchTokens')}"),
            (
                "Parallelism",
                f"{par.get('strategy', 'ddp')} {par.get('numNodes', 1)}x{par.get('nprocPerNode', 1)} (local: "
                f"{record.local.layout or '-'})",
            ),
            ("Registry", spec.get("registry", {}).get("registeredModelName") or record.name),
        ]
    model = spec["model"]
    approval = spec.get("approval", {})
    auth = spec.get("auth", {})
    ref = auth.get("apiKeySecretRef")
    return [
        (
            "Model",
            model["registeredModelName"]
            + (
                f" version {model['version']}" if model.get("version") else f" alias {model.get('alias') or 'champion'}"
            ),
        ),
        (
            "Approval",
            ", ".join(f"{k}={v}" for k, v in approval.get("requiredTags", {"review": "approved"}).items())
            + (f", alias {approval['requiredAlias']}" if approval.get("requiredAlias") else ""),
        ),
        (
            "Auth",
            "disabled"
            if auth.get("disabled")
            else f"Secret {ref['name']}/{ref.get('key', 'api-keys')} -> {record.local.api_keys_file or '-'}",
        ),
        ("Route prefix", spec.get("endpoint", {}).get("routePrefix", "/")),
        ("Rollout", _rollout_summary(spec.get("rollout", {}))),
    ]


def _rollout_summary(rollout: dict) -> str:
    if rollout.get("strategy", "InPlace") != "Canary":
        return "InPlace"
    judged = ", ".join(f"{k} {v}" for k, v in rollout.get("canary", {}).items())
    steps = "/".join(f"{w}%" for w in rollout.get("canarySteps", [10, 50, 100]))
    return f"Canary {steps}" + (f" ({judged})" if judged else "")


def canary_lines(canary: dict, stable: str | None) -> list[str]:
    """The split and the numbers each version was last judged on (status.canary, wire form)."""
    weight, state = canary.get("weight", 0), canary.get("state", "Running")
    split = f"version {canary['version']} {weight}% / version {stable or '-'} {100 - weight}%"
    if state == "Promoted":
        split = f"version {canary['version']} promoted: it takes 100% as the stable version"
    lines = [
        "Canary:",
        f"  {'Split:':<14}{split}",
        f"  {'State:':<14}{state}, step {canary.get('step', 0) + 1} since {canary.get('stepStarted', '-')}",
        f"  {'Verdict:':<14}{canary.get('verdict') or '-'}",
    ]
    rows = []
    for role, version, key in (("canary", canary["version"], "canaryNumbers"), ("stable", stable, "stableNumbers")):
        n = canary.get(key)
        if n:
            values = ("errorRate", "p95LatencyMs", "ownStopRate", "meanCompletionTokens")
            rows.append((role, version or "-", str(n.get("requests", 0)), *(str(n.get(k, "-")) for k in values)))
    if rows:
        columns = ("ROLE", "VERSION", "REQUESTS", "ERROR RATE", "P95 MS", "OWN STOP", "MEAN TOKENS")
        lines += ["  " + line for line in table(columns, rows).splitlines()]
    return lines


def evaluation_rows(tags: dict[str, str]) -> list[tuple[str, str, str]]:
    """(suite, metric, value) from a model version's eval.<suite>.<metric> tags (run ids left out)."""
    rows = []
    for key, value in sorted(tags.items()):
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "eval" and parts[2] != "run_id":
            rows.append((parts[1], parts[2].replace("_at_", "@"), value))
    return rows


def lineage_rows(info) -> list[tuple[str, str]]:
    """The chain from data to endpoint for a registry version (midfill.registry.VersionInfo)."""
    from midfill.registry import TAG_ATTEMPT, TAG_DATA_HASH, TAG_RUN_NAME, TAG_RUN_UID

    t = info.tags
    return [
        (
            "TrainingRun",
            f"{t.get(TAG_RUN_NAME, '-')} (uid {t.get(TAG_RUN_UID, '-')}, attempt {t.get(TAG_ATTEMPT, '-')})",
        ),
        ("Data hash", t.get(TAG_DATA_HASH, "-")),
        ("MLflow run", info.run_id or "-"),
        ("Version", f"{info.uri} (MLflow UI: #/models/{info.name}/versions/{info.version})"),
        ("Served as", f"x-midfill-model-version: {info.name}/{info.version}"),
    ]


def describe(
    record: StoredResource,
    *,
    evaluation: tuple[str, dict[str, str]] | None = None,
    lineage: list[tuple[str, str]] | None = None,
) -> str:
    """kubectl-describe-like text: metadata, spec summary, status, conditions, evaluation results of
    the version it trained or serves (`evaluation` = (version uri, its tags)), events."""
    meta = record.resource["metadata"]
    status = record.status()
    lines = [
        f"Name:         {record.name}",
        f"Kind:         {record.kind}",
        f"UID:          {meta.get('uid')}",
        f"Generation:   {meta.get('generation')}",
        f"Created:      {meta.get('creationTimestamp')} ({age(meta.get('creationTimestamp'))} ago)",
        "Spec:",
    ]
    lines += [f"  {k + ':':<14}{v}" for k, v in _spec_summary(record)]
    lines.append("Status:")
    wire = status.to_wire()
    conditions = wire.pop("conditions", [])
    canary = wire.pop("canary", None)
    for key, value in wire.items():
        text = value if not isinstance(value, dict) else ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"  {key + ':':<24}{text}")
    if record.local.log_file or record.local.supervisor_log:
        lines.append(f"  {'logs:':<24}{record.local.log_file or record.local.supervisor_log}")
    if canary:
        lines += canary_lines(canary, getattr(status, "stable_version", None))
    lines.append("Conditions:")
    if conditions:
        rows = [
            (c["type"], c["status"], c.get("reason", ""), c.get("lastTransitionTime", ""), c.get("message", ""))
            for c in conditions
        ]
        lines += ["  " + line for line in table(("TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"), rows).splitlines()]
    else:
        lines.append("  <none>")
    if lineage:
        lines.append("Lineage:")
        lines += [f"  {k + ':':<14}{v}" for k, v in lineage]
    if evaluation is not None:
        uri, tags = evaluation
        rows = evaluation_rows(tags)
        lines.append(f"Evaluation ({uri}):")
        if rows:
            lines += ["  " + line for line in table(("SUITE", "METRIC", "VALUE"), rows).splitlines()]
        else:
            lines.append(f"  <none> (run: midfill eval {uri} --suite line-em)")
    lines.append("Events:")
    if record.events:
        rows = [(e.time, e.type, e.reason, e.message) for e in record.events]
        lines += ["  " + line for line in table(("TIME", "TYPE", "REASON", "MESSAGE"), rows).splitlines()]
    else:
        lines.append("  <none>")
    return "\n".join(lines)
