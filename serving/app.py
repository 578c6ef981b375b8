"""The Ray Serve application: `serve run serving.app:build_app model_uri=...`, a RayService's
serveConfigV2 (import_path serving.app:build_app, args = midfill.serve_args.ServeArgs fields), or
`midfill serve`. All three hand build_app the same dict.

Ray's options come from the args: autoscaling, and max_ongoing_requests sized above the expected
concurrency (Ray's default of 5 collapses throughput, docs/cpu-notes.md). The replica itself admits up to
max_ongoing_requests + max_queued_requests generation requests and answers 429 beyond that; Ray's
own queue is a backstop at twice the whole deployment's capacity.
Limits and keys go through user_config, so changing them calls reconfigure() instead of reloading;
changing model_uri rolls new replicas in while old ones drain their requests. max_surge_percent keeps
the old replicas serving until their replacements are ready (loaded and warmed up, serving.ingress);
without it Ray stops an old replica first, and a new version that never loads leaves nothing serving.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from midfill.serve_args import KEY_SETTINGS, RELOADABLE, ROUTER_SETTINGS, ServeArgs
from serving.canary import CanaryRouter
from serving.ingress import InfillModel, InfillServer

# Routes that are not generation (health, metrics, models) must still reach a full replica.
CONTROL_HEADROOM = 8
# Ray's own queue limit, as a multiple of what the replicas admit (see deployment_options).
BACKSTOP_FACTOR = 2
# Long streams finish on the old replica while a new model version takes over.
GRACEFUL_SHUTDOWN_S = 300
# Start every replacement before stopping the replica it replaces (Ray Serve's rolling restart):
# the stable version keeps serving until the new one is loaded, and keeps serving if it never is.
MAX_SURGE_PERCENT = 100


def deployment_options(args: ServeArgs) -> dict[str, Any]:
    """The Ray Serve deployment options these args ask for (pure; tested without Ray)."""
    queued = max(args.max_queued_requests, 0)
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests + queued + CONTROL_HEADROOM,
        # Ray counts every request not yet assigned to a replica, so a burst of clients can trip a
        # small limit even when replicas have room (503 from the proxy; seen in CI with a 50-request
        # burst against a limit of 44 on a loaded machine). Our replicas answer 429 at their own
        # limit; Ray's queue is only a backstop, at twice the whole deployment's capacity.
        "max_queued_requests": -1
        if args.max_queued_requests < 0
        else BACKSTOP_FACTOR * (args.max_ongoing_requests + queued) * args.max_replicas,
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "user_config": {k: getattr(args, k) for k in RELOADABLE},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": 10,
        "max_surge_percent": MAX_SURGE_PERCENT,
    }
    if args.min_replicas == args.max_replicas:
        options["num_replicas"] = args.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": args.upscale_delay_s,
            "downscale_delay_s": args.downscale_delay_s,
        }
    return options


# The router only forwards: a fraction of a CPU (it must fit beside the model replicas' requests).
ROUTER_CPUS = 0.25
# The deployment names in a canary application (serving.canary): the router is the ingress.
STABLE_DEPLOYMENT, CANARY_DEPLOYMENT, ROUTER_DEPLOYMENT = "InfillServer", "InfillCanary", "CanaryRouter"


def _model_deployment(args: ServeArgs, name: str, *, ingress: bool = True) -> Application:
    # Reloadable settings travel in user_config only, so a change to them leaves the init args
    # (and therefore the replicas) untouched; the router's settings never reach a model replica.
    init_args = args.model_dump(exclude=(set(RELOADABLE) - set(KEY_SETTINGS)) | set(ROUTER_SETTINGS))
    deployment = InfillServer if ingress else InfillModel
    return deployment.options(name=name, **deployment_options(args)).bind(init_args)


def canary_args(args: ServeArgs) -> ServeArgs:
    """The canary deployment's args: the canary's model, autoscaled from 1 up to the release's
    maxReplicas (so a canary costs at least one and at most maxReplicas extra replicas)."""
    assert args.canary_model_uri is not None
    return args.model_copy(update={"model_uri": args.canary_model_uri, "min_replicas": 1})


def router_options(args: ServeArgs) -> dict[str, Any]:
    """The canary router's options: one small replica that admits whatever both model deployments
    together admit (Ray's default of 5 ongoing requests would throttle the whole endpoint)."""
    model = deployment_options(args)
    return {
        "num_replicas": 1,
        "max_ongoing_requests": 2 * model["max_ongoing_requests"] * args.max_replicas,
        "max_queued_requests": model["max_queued_requests"],
        "ray_actor_options": {"num_cpus": ROUTER_CPUS},
        "user_config": {"weight": args.canary_weight},
        # Streams through a replaced router finish on it. No max_surge here (unlike the models): an old
        # router kept serving beside its replacement would still route to a canary deployment that
        # the new config removed, and those requests would wait for replicas that never come; the
        # proxy holds requests for the moment between the old router and the new one instead.
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }


def build_app(args: ServeArgs | dict[str, Any]) -> Application:
    """The application for these args (a ServeArgs or a dict of its fields)."""
    parsed = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    if not parsed.router:
        return _model_deployment(parsed, STABLE_DEPLOYMENT)
    stable = _model_deployment(parsed, STABLE_DEPLOYMENT, ingress=False)
    canary_uri = parsed.canary_model_uri
    canary = _model_deployment(canary_args(parsed), CANARY_DEPLOYMENT, ingress=False) if canary_uri else None
    router = CanaryRouter.options(name=ROUTER_DEPLOYMENT, **router_options(parsed))
    return router.bind(stable, canary)
