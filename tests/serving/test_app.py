"""build_app's Ray Serve options come from ServeArgs (pure; no Ray cluster needed)."""

from __future__ import annotations

import pytest

from midfill.serve_args import ServeArgs
from serving.app import BACKSTOP_FACTOR, CONTROL_HEADROOM, build_app, deployment_options
from serving.ingress import RELOADABLE


def _args(**kw) -> ServeArgs:
    return ServeArgs(model_uri="/models/x", auth_disabled=True, **kw)


def test_autoscaling_and_limits_come_from_args():
    opts = deployment_options(
        _args(
            min_replicas=1,
            max_replicas=4,
            target_ongoing_requests=6,
            upscale_delay_s=5,
            downscale_delay_s=60,
            max_ongoing_requests=48,
            max_queued_requests=16,
            num_cpus=2,
        )
    )
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 6,
        "upscale_delay_s": 5,
        "downscale_delay_s": 60,
    }
    # The replica answers 429 itself, so Ray must deliver everything up to that limit (and above Ray's default of 5).
    assert opts["max_ongoing_requests"] == 48 + 16 + CONTROL_HEADROOM
    assert opts["max_queued_requests"] == BACKSTOP_FACTOR * (48 + 16) * 4
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}


def test_fixed_replicas_and_unbounded_queue():
    opts = deployment_options(_args(min_replicas=2, max_replicas=2, max_queued_requests=-1))
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["max_queued_requests"] == -1


def test_reloadable_settings_travel_in_user_config_only():
    app_a = build_app(_args(max_new_tokens=100).model_dump())
    app_b = build_app(_args(max_new_tokens=300))
    dep_a, dep_b = (a._bound_deployment for a in (app_a, app_b))
    assert dep_a._deployment_config.user_config["max_new_tokens"] == 100
    assert dep_b._deployment_config.user_config["max_new_tokens"] == 300
    # Same init args -> Ray reconfigures the running replicas instead of replacing them.
    assert dep_a.init_args == dep_b.init_args
    assert set(deployment_options(_args())["user_config"]) == set(RELOADABLE)


def test_bad_args_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="auth"):
        build_app({"model_uri": "/models/x"})
