"""GKE: a JobSet with one replicated Job per TPU slice and one pod per TPU host, applied with
`kubectl`. The resolved job config travels in a ConfigMap mounted at /etc/podtrain.

Every pod joins one `jax.distributed` job: the coordinator is pod 0 of slice 0, addressed by the
host name JobSet gives it (`<jobset>-slice-0-0.<jobset>`); a pod's process id is
slice index x hosts per slice + its completion index, both read from the pod's own annotations
through the downward API. Multi-slice runs also get the MEGASCALE_* variables libtpu uses for DCN.
"""

from pathlib import Path

import yaml

from podtrain.launch.submission import JOB_CONFIG, Submission, job_config, resource_name
from podtrain.parallel import distributed
from podtrain.plan import topology
from podtrain.train.config import Config

CONFIG_DIR = "/etc/podtrain"
COORDINATOR_PORT = 8476
MEGASCALE_PORT = 8080
REPLICATED_JOB = "slice"
JOB_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(cfg: Config, name: str, sl: topology.Slice) -> list[dict]:
    slices = cfg.launch.num_slices
    coordinator_host = f"{name}-{REPLICATED_JOB}-0-0.{name}"
    env = [
        _field("PODTRAIN_SLICE_INDEX", JOB_INDEX),
        _field("PODTRAIN_HOST_INDEX", COMPLETION_INDEX),
        {"name": distributed.ENV_COORDINATOR, "value": f"{coordinator_host}:{COORDINATOR_PORT}"},
        {"name": distributed.ENV_NUM_PROCESSES, "value": str(slices * sl.hosts)},
        {"name": "PODTRAIN_JOB_NAME", "value": cfg.launch.job_name},
    ]
    if slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": coordinator_host},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
            _field("MEGASCALE_SLICE_ID", JOB_INDEX),
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    return env


def manifests(cfg: Config) -> list[dict]:
    """[ConfigMap, JobSet] for `cfg.launch` (see the module docstring)."""
    sl = topology.parse(cfg.launch.tpu_type, "launch.tpu_type")
    name = resource_name(cfg.launch.job_name)
    ns = cfg.launch.namespace
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": ns},
        "data": {JOB_CONFIG: job_config(cfg, tpu_slices=True)},
    }
    # The process id needs arithmetic on two annotations; nothing user-given is in this line.
    start = (
        f"export {distributed.ENV_PROCESS_ID}=$((PODTRAIN_SLICE_INDEX * {sl.hosts} + PODTRAIN_HOST_INDEX)) && "
        f"exec podtrain pretrain --config {CONFIG_DIR}/{JOB_CONFIG}"
    )
    container = {
        "name": "podtrain",
        "image": cfg.launch.image,
        "command": ["bash", "-c", start],
        "env": _env(cfg, name, sl),
        "ports": [{"containerPort": COORDINATOR_PORT}, {"containerPort": MEGASCALE_PORT}],
        "resources": {"limits": {"google.com/tpu": sl.chips // sl.hosts}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {
            "cloud.google.com/gke-tpu-accelerator": sl.gke_accelerator,
            "cloud.google.com/gke-tpu-topology": sl.shape_str,
        },
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}}],
    }
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": {
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool",
                "podtrain/job-name": cfg.launch.job_name,
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": cfg.launch.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": sl.hosts,
                            "completions": sl.hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,
                            "template": {"spec": pod},
                        }
                    },
                }
            ],
        },
    }
    return [config_map, jobset]


def submission(cfg: Config, stage: Path) -> Submission:
    if not cfg.launch.image:
        from podtrain.train.config import ConfigError

        raise ConfigError("launch.image is empty: gke needs a container image with podtrain installed")
    path = stage / "jobset.yaml"
    text = yaml.safe_dump_all(manifests(cfg), sort_keys=False)
    return Submission({path: text}, [["kubectl", "apply", "-f", str(path)]], tool="kubectl")
