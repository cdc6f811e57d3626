"""Kubernetes settings of the cluster path (dagster-k8s; docker/k8s/values.yaml, docs/deploying.md).

On Kubernetes every run is a pod (``K8sRunLauncher``, Helm values) and, with
``k8s_job_executor``, every step of a run is its own pod: a data-layer run over a partition
range extracts, aggregates and rasterizes in three pods, and training and embedding get a GPU
node while the rest stays on CPU nodes. The executor is chosen by the environment
(``S2VEC_EXECUTOR=k8s``, set on the code location's deployment in the Helm values), so the same
definitions still run locally and under Docker with Dagster's default executor.

The GPU node selector assumes the label the NVIDIA GPU Operator (GPU feature discovery) puts on
GPU nodes; change ``GPU_NODE_SELECTOR`` to your cluster's (e.g. GKE's
``cloud.google.com/gke-accelerator``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from s2vec_pipeline.settings import ENV_EXECUTOR, executor_name

K8S_CONFIG_TAG = "dagster-k8s/config"

# Ops that train or run the MAE: the GPU steps (names of the ops computing mae_model and the
# two embedding tables).
GPU_OPS: tuple[str, ...] = ("mae_model", "embeddings")

GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]

# dagster-k8s's user-defined config (the schema of the `dagster-k8s/config` tag): one GPU,
# host memory for the raster tiles of the training partitions, on a GPU node.
GPU_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
        }
    },
    "pod_spec_config": {"node_selector": GPU_NODE_SELECTOR, "tolerations": GPU_TOLERATIONS},
}

# Every other step (extract, cell features, rasters) on CPU nodes.
CPU_STEP_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "1", "memory": "4Gi"},
            "limits": {"memory": "8Gi"},
        }
    }
}

# For the train_model and embed jobs when runs execute inside their run pod (K8sRunLauncher
# without the k8s executor): the whole run pod gets the GPU. With the k8s executor the step
# pods get it from `per_step_k8s_config` below and this tag only shapes the run pod.
GPU_JOB_TAGS: dict[str, Any] = {K8S_CONFIG_TAG: GPU_K8S_CONFIG}


def k8s_executor_config(max_concurrent: int = 4) -> dict[str, Any]:
    """Run config of ``k8s_job_executor``: CPU steps by default, GPU steps for ``GPU_OPS``;
    at most ``max_concurrent`` step pods at once per run."""
    return {
        "max_concurrent": max_concurrent,
        "step_k8s_config": CPU_STEP_K8S_CONFIG,
        "per_step_k8s_config": {op: GPU_K8S_CONFIG for op in GPU_OPS},
    }


def k8s_executor(max_concurrent: int = 4) -> dg.ExecutorDefinition:
    """``k8s_job_executor`` configured for the pipeline: every step in its own pod."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(max_concurrent), name="s2vec_k8s")


def in_run_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition:
    """The executor of the jobs whose steps are light (data layer, regions, sources): every step
    in the run's own process (a fresh Python process per step loads the definitions, ~2-10 s,
    more than such a step's work), or Kubernetes pods when ``S2VEC_EXECUTOR=k8s``."""
    return executor_from_env(environ) or dg.in_process_executor


def executor_from_env(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor the definitions should use: the k8s one when ``S2VEC_EXECUTOR=k8s``, else
    None (Dagster's default multiprocess executor)."""
    choice = executor_name(environ)
    if choice in ("", "default", "multiprocess"):
        return None
    if choice == "k8s":
        return k8s_executor()
    from s2vec_pipeline.errors import S2VecError

    raise S2VecError(f"{ENV_EXECUTOR}={choice!r} is not an executor: use k8s or leave it unset")
