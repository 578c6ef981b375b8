"""midfill/memory.py: a TrainingRun's memory per GPU and per node, estimated from its spec."""

from __future__ import annotations

import pytest

from midfill import memory
from midfill.api import load_file
from midfill.api.common import NodePool
from midfill.recipes import get_recipe

GIB = 1024**3


@pytest.fixture
def seven_b(repo_root):
    (run,) = load_file(repo_root / "manifests/samples/trainingrun-7b-flash.yaml")
    return run.spec


def test_the_7b_recipe_has_llama_7b_parameters():
    assert get_recipe("7b").num_params(32000) == pytest.approx(6.74e9, rel=0.01)


def test_fsdp_shards_weights_gradients_and_optimizer_over_the_world(seven_b):
    sharded = memory.estimate(seven_b)
    replicated = memory.estimate(
        seven_b.model_copy(update={"parallelism": seven_b.parallelism.model_copy(update={"strategy": "ddp"})})
    )
    assert sharded is not None and replicated is not None
    assert replicated.optimizer == pytest.approx(32 * sharded.optimizer)
    assert replicated.optimizer == 8 * sharded.parameters  # AdamW: two fp32 moments per parameter
    assert sharded.per_gpu < 80 * GIB < replicated.per_gpu
    assert memory.warnings(seven_b, sharded, gpu_gib=80) == []


def test_activation_checkpointing_trades_activations_for_recompute(seven_b):
    modes = {}
    for mode in ("none", "selective", "full"):
        spec = seven_b.model_copy(
            update={"training": seven_b.training.model_copy(update={"activation_checkpointing": mode})}
        )
        est = memory.estimate(spec)
        assert est is not None
        modes[mode] = est.activations
    assert modes["none"] > modes["selective"] > modes["full"] and modes["full"] * 10 < modes["none"]


@pytest.mark.parametrize(
    ("selector", "gib"),
    [
        ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, 80),
        ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 40),
        ({"nvidia.com/gpu.memory": "81559"}, 79.6),
        ({"nvidia.com/gpu.product": "NVIDIA-GH200-480GB"}, 96),  # 480 GB counts the Grace CPU's memory
        ({"node.kubernetes.io/instance-type": "p4d.24xlarge"}, 40),
        ({"kubernetes.io/hostname": "gpu-1"}, None),
    ],
)
def test_the_pools_gpu_memory_is_read_from_its_node_labels(selector, gib):
    found = memory.pool_gpu_memory(NodePool(node_selector=selector))
    assert (found[0] if found else None) == (pytest.approx(gib, abs=0.1) if gib else None)


def test_memory_quantities():
    assert memory.quantity_bytes("16Gi") == 16 * GIB
    assert memory.quantity_bytes("64G") == 64e9
    assert memory.quantity_bytes(1000) == 1000
    assert memory.quantity_bytes("lots") is None
